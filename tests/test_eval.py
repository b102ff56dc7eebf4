"""Quality evaluation: domain FID/KID with floor and ceiling, the card, the CLI, and training that
keeps the best checkpoint by FID. Real prepared data, real feature nets, real Ray Train."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_config

from aigc_ray.data.pipeline import ensure_prepared, load_split
from aigc_ray.data.prepare import read_manifest
from aigc_ray.eval import evaluate_checkpoint
from aigc_ray.eval.featnet import load_or_train
from aigc_ray.eval.quality import _pick, domain_metrics, memorisation
from aigc_ray.images import encode_png
from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import read_card, save_checkpoint


def _prepared(tmp_path, data_root, dataset="digits"):
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": str(data_root), "data.dataset": dataset})
    return cfg, ensure_prepared(cfg.data, cfg.train.seed)


def _untrained_checkpoint(directory, cfg, prepared):
    manifest = read_manifest(prepared)
    torch.manual_seed(1)
    save_checkpoint(directory, experiment=cfg, served_state=build_generator(cfg.model).state_dict(), step=0, epoch=0,
                    ema=False, dataset={"prepared": prepared, "content_hash": manifest["content_hash"]})
    return str(directory)


def test_floor_is_near_zero_next_to_noise(tmp_path, data_root):
    _, prepared = _prepared(tmp_path, data_root)
    net, info = load_or_train(prepared)
    assert info["kind"] == "classifier" and info["test_accuracy"] > 0.8  # the features mean something
    train, test = load_split(prepared, "train")[0], load_split(prepared, "test")[0]
    n = len(test)
    reference = _pick(train, n, 0)
    floor = domain_metrics(net, reference, test)
    noise = domain_metrics(net, reference, torch.randint(0, 256, test.shape, dtype=torch.uint8))
    assert floor["fid"] * 20 < noise["fid"], (floor, noise)
    assert floor["kid"] * 20 < noise["kid"] and floor["precision"] > 0.8 > noise["precision"]
    # real digits cover every class evenly and the classifier is sure of them; noise does not
    assert floor["class_coverage"] == 1.0 and floor["mode_entropy"] > 0.95 and floor["inception_score"] > 7
    assert noise["inception_score"] < floor["inception_score"]
    # the house FID is the field's FID through this net: torchmetrics' on the same features agrees
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=net)
    fid.update(reference, real=True)
    fid.update(test, real=False)
    assert abs(float(fid.compute()) - floor["fid"]) < 1e-3 * floor["fid"] + 1e-6


def test_memorisation_flags_copies_of_training_images_not_new_ones(tmp_path, data_root):
    _, prepared = _prepared(tmp_path, data_root)
    train, test = load_split(prepared, "train")[0], load_split(prepared, "test")[0]
    half = len(test) // 2
    copies = memorisation(train[:half], test[half:], train)  # a "generator" that replays training images
    assert copies["near_copies"] == 1.0 and copies["flagged"] and copies["median_nn_distance"] == 0
    fresh = memorisation(test[:half], test[half:], train)  # new real images: as near as held-out ones are
    assert fresh["near_copies"] < 0.05 and not fresh["flagged"]


def test_card_round_trips_and_reads_as_ratios(tmp_path, data_root):
    cfg, prepared = _prepared(tmp_path, data_root)
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", cfg, prepared)
    result = evaluate_checkpoint(ckpt, num_samples=100, seed=3, dataset=prepared)
    card = read_card(ckpt)
    assert card == json.loads(json.dumps(result["card"]))
    assert result["fid"] == card["metrics"]["fid"] and result["fid_floor"] == card["floor"]["fid"]
    assert abs(result["fid_ratio"] - result["fid"] / result["fid_floor"]) < 1e-9
    # an untrained generator sits at the ceiling, far above the floor
    assert result["fid_ratio"] > 10 and result["fid_ceiling"] > 10 * result["fid_floor"]
    p = card["protocol"]
    assert p["content_hash"] == read_manifest(prepared)["content_hash"] and p["num_samples"] == 100
    assert p["seed"] == 3 and p["weights"] == "raw" and p["feature_net"]["test_accuracy"] > 0.8
    assert p["feature_net"]["format"] == "aigc-ray-featnet/2" and p["feature_net"]["feature_dim"] == 384
    # every score is a mean over draws with its 95% interval; the floor has its own (resampled real sets)
    assert p["draws"] == cfg.eval.draws and len(card["draws"]["fid"]) == cfg.eval.draws
    for name, value in card["metrics"].items():
        lo, hi = card["intervals"][name]
        assert lo <= value <= hi and abs(value - sum(card["draws"][name]) / p["draws"]) < 1e-9, name
        flo, fhi = card["floor_intervals"][name]
        assert flo <= card["floor"][name] <= fhi, name
    assert result["fid_lo"] < result["fid"] < result["fid_hi"] and result["fid_ratio_lo"] < result["fid_ratio"]
    assert result["fid_floor_lo"] < result["fid_floor"] < result["fid_floor_hi"]
    assert card["memorisation"]["near_copies"] < 0.05 and not card["memorisation"]["flagged"]
    again = evaluate_checkpoint(ckpt, num_samples=100, seed=3, write_card=False, dataset=prepared)
    assert again["fid"] == result["fid"]  # same seed, same numbers
    other = evaluate_checkpoint(ckpt, num_samples=100, seed=4, draws=3, write_card=False, dataset=prepared)
    assert other["fid"] != result["fid"] and other["card"]["protocol"]["draws"] == 3


def test_an_old_protocol_card_is_kept_marked_and_replaced(tmp_path, data_root):
    cfg, prepared = _prepared(tmp_path, data_root)
    ckpt = Path(_untrained_checkpoint(tmp_path / "ckpt", cfg, prepared))
    old = {"format": "aigc-ray-card/1", "model_version": "v", "metrics": {"fid": 0.6}, "floor": {"fid": 0.9},
           "ceiling": {"fid": 90.0}, "ratio": {"fid": 0.67}, "protocol": {"num_samples": 384, "notes": []}}
    (ckpt / "card.json").write_text(json.dumps(old))
    assert "one draw" in read_card(ckpt)["old_protocol"]  # read as it is, said to be of the old protocol
    evaluate_checkpoint(str(ckpt), num_samples=50, draws=2, dataset=prepared)
    assert read_card(ckpt)["format"] == "aigc-ray-card/2" and "old_protocol" not in read_card(ckpt)
    kept = json.loads((ckpt / "card.aigc-ray-card-1.json").read_text())
    assert kept["metrics"] == old["metrics"] and kept["old_protocol"]


def test_more_samples_than_the_data_allows_is_an_error_that_says_how_many(tmp_path, data_root, capsys):
    from aigc_ray.cli import main

    cfg, prepared = _prepared(tmp_path, data_root)
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", cfg, prepared)
    n_test = len(load_split(prepared, "test")[0])
    assert main(["eval", "--checkpoint", ckpt, "--dataset", prepared, "--num-samples", "100000", "--no-card"]) == 2
    assert f"at most {n_test}" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", ckpt, "--dataset", prepared, "--draws", "1", "--no-card"]) == 2
    assert "--draws" in capsys.readouterr().err
    # the config's own num_samples is capped with a note instead (a default must work on any data)
    card = evaluate_checkpoint(ckpt, draws=2, write_card=False, dataset=prepared)["card"]
    assert card["protocol"]["num_samples"] == min(cfg.eval.num_samples, n_test)


def test_class_accuracy_counts_the_class_asked_for(tmp_path, data_root):
    _, prepared = _prepared(tmp_path, data_root)
    net, _ = load_or_train(prepared)
    (train, _), (test, labels) = load_split(prepared, "train"), load_split(prepared, "test")
    reference = _pick(train, len(test), 0)
    right = domain_metrics(net, reference, test, fake_labels=labels)
    wrong = domain_metrics(net, reference, test, fake_labels=(labels + 1) % 10)  # every image "asked" as another digit
    assert right["class_accuracy"] > 0.8 > 0.2 > wrong["class_accuracy"]
    assert "class_accuracy" not in domain_metrics(net, reference, test)  # no labels asked: nothing to count

    # on the card: a conditional generator is scored on it (floor: the net on held-out digits with their
    # own labels; ceiling: the untrained generator, near chance); an unconditional one is not
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": str(data_root), "model.num_classes": 10})
    card = evaluate_checkpoint(_untrained_checkpoint(tmp_path / "cond", cfg, prepared), num_samples=200,
                               write_card=False, dataset=prepared)["card"]
    assert card["floor"]["class_accuracy"] > 0.8 > 0.4 > card["ceiling"]["class_accuracy"]
    assert card["metrics"]["class_accuracy"] < 0.4  # untrained: it draws no digit on request
    assert card["ratio"]["class_accuracy"] == card["metrics"]["class_accuracy"] / card["floor"]["class_accuracy"]
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": str(data_root)})
    card = evaluate_checkpoint(_untrained_checkpoint(tmp_path / "uncond", cfg, prepared), num_samples=200,
                               write_card=False, dataset=prepared)["card"]
    assert "class_accuracy" not in card["metrics"] and "class_accuracy" in card["floor"]


def test_unlabelled_dataset_falls_back_to_autoencoder_features(tmp_path, data_root, capsys):
    prepared = _prepared(tmp_path, data_root)[1]  # (prepare splits by pixel hash: take images of both splits)
    images = torch.cat([load_split(prepared, "train")[0][:240], load_split(prepared, "test")[0][:60]])
    folder = tmp_path / "plain"  # images at the top level: no sub-folders, so no labels
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:04d}.png").write_bytes(encode_png(image))
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": str(tmp_path / "data"),
                                                "data.dataset": f"folder:{folder}"})
    prepared = ensure_prepared(cfg.data, cfg.train.seed)
    assert read_manifest(prepared)["num_classes"] == 0
    result = evaluate_checkpoint(_untrained_checkpoint(tmp_path / "ckpt", cfg, prepared), num_samples=50,
                                 data_root=str(tmp_path / "data"))  # found by content hash in the cache
    assert "no class labels" in capsys.readouterr().err
    card = result["card"]
    assert card["protocol"]["feature_net"]["kind"] == "autoencoder"
    assert any("no class labels" in n for n in card["protocol"]["notes"])
    assert "inception_score" not in card["metrics"] and "class_coverage" not in card["metrics"]
    assert result["fid_floor"] < result["fid"] and 0 <= result["precision"] <= 1


def test_cli_eval_prints_the_table_and_writes_the_card(tmp_path, data_root):
    cfg, prepared = _prepared(tmp_path, data_root)
    ckpt = Path(_untrained_checkpoint(tmp_path / "ckpt", cfg, prepared))
    proc = subprocess.run([sys.executable, "-m", "aigc_ray.cli", "eval", "--checkpoint", str(ckpt),
                           "--num-samples", "64", "--dataset", prepared], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *rows = proc.stdout.splitlines()
    assert header.split()[0] == "metric" and "value [95% interval]" in header and "ratio [95%]" in header
    fid_row = next(r for r in rows if r.startswith("fid"))
    assert fid_row.count("[") == 3  # value, floor and ratio each with an interval
    assert any(r.startswith("class_coverage") for r in rows) and any("draws of 64" in r for r in rows)
    card = read_card(ckpt)
    assert card["protocol"]["num_samples"] == 64 and card["metrics"]["fid"] > 0
    proc = subprocess.run([sys.executable, "-m", "aigc_ray.cli", "eval", "--checkpoint", str(tmp_path),
                           "--no-card"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an aigc-ray checkpoint" in proc.stderr


def test_training_evaluates_and_names_the_best_checkpoint(tiny_dcgan_run, capsys):
    from aigc_ray.train.loop import main_print

    outcome = tiny_dcgan_run  # the session's tiny dcgan: 2 epochs, each scored, the best one kept
    history = [json.loads(line) for line in Path(outcome.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    fids = {h["epoch"]: h["fid"] for h in history}  # every evaluated epoch's FID lands in metrics.jsonl
    assert all(f > 0 and h["fid_floor"] > 0 for f, h in zip(fids.values(), history))
    best_epoch = min(fids, key=fids.get)
    card = read_card(outcome.checkpoint)
    assert card["epoch"] == best_epoch and card["metrics"]["fid"] == fids[best_epoch]
    assert outcome.best_metrics["fid"] == fids[best_epoch] and Path(outcome.latest).is_dir()
    assert Path(outcome.run_dir, "metrics.png").read_bytes()[:4] == b"\x89PNG"
    main_print(outcome)
    assert capsys.readouterr().out.strip().splitlines()[-1] == outcome.checkpoint


def test_evaluation_runs_in_the_background_with_the_threads_it_starts():
    # run in a child: a background thread can't come back to normal, and would slow the other tests
    code = """
import os, threading
from aigc_ray.train.validation import run_in_background
run_in_background()
policies = []
t = threading.Thread(target=lambda: policies.append(os.sched_getscheduler(threading.get_native_id())))
t.start(); t.join()
print([os.sched_getscheduler(0), *policies])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{os.SCHED_IDLE}, {os.SCHED_IDLE}]"


def test_an_evaluation_worker_is_in_the_background_before_its_heavy_imports():
    # the validation task's runtime_env sets AIGC_RAY_EVAL_WORKER: the first import of aigc_ray
    # in that worker lowers its priority, before torch is imported; other processes are untouched
    code = "import os, sys, aigc_ray; print(os.sched_getscheduler(0), 'torch' in sys.modules)"
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run(env=dict(os.environ, AIGC_RAY_EVAL_WORKER="background")).stdout.split() == [str(os.SCHED_IDLE), "False"]
    assert run(env={k: v for k, v in os.environ.items() if k != "AIGC_RAY_EVAL_WORKER"}).stdout.split() == [
        str(os.SCHED_OTHER), "False"]
