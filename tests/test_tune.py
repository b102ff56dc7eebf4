"""Sweeps with Ray Tune on a real local Ray: spec validation, an ASHA sweep that is interrupted
(Ctrl-C), resumed and exported, and PBT's mutated hyperparameters in force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aigc_ray.cli import main
from aigc_ray.config import ConfigError
from aigc_ray.tuning.spec import load_spec, spec_from_dict

TINY = {"data.image_size": 8, "model.image_size": 8, "model.width": 8, "model.latent_dim": 8,
        "train.batch_size": 32, "train.checkpoint_every": 100000, "train.sample_every": 100}


def _spec(**changes) -> dict:
    raw = {"name": "t", "base": "dcgan-digits", "overrides": dict(TINY), "metric": "fid", "epochs": 2,
           "num_samples": 2, "eval_samples": 64, "space": {"train.lr_g": {"loguniform": [1e-4, 1e-3]}},
           "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}
    raw.update(changes)
    return raw


# --- bad specs fail before any trial starts, naming the key -------------------------------

@pytest.mark.parametrize("changes, named", [
    ({"schedular": {"type": "asha"}}, "schedular"),
    ({"scheduler": {"type": "asha", "grace": 1}}, "scheduler.grace"),
    ({"epochs": "ten"}, "epochs"),
    ({"num_samples": 0}, "num_samples"),
    ({"space": {}}, "space is empty"),
    ({"space": {"train.lr_g": {"loguniform": [1e-3, 1e-4]}}}, "space.train.lr_g"),
    ({"space": {"train.lr_g": {"normal": [0, 1]}}}, "space.train.lr_g"),
    ({"space": {"train.batch_size": {"choice": ["big"]}}}, "space.train.batch_size"),
    ({"space": {"train.lr": {"choice": [1e-4]}}}, "train.lr"),
    ({"space": {"model.options.gp_weight": {"uniform": [1, 10]}}}, "space.model.options.gp_weight"),  # not a WGAN-GP
    ({"space": {"train.epochs": {"choice": [1, 2]}}}, "space.train.epochs"),
    ({"metric": "kl"}, "metric='kl'"),  # a VAE metric for a DCGAN
    ({"mode": "lowest"}, "mode"),
    ({"overrides": {"train.lr_gg": 1e-4}}, "train.lr_gg"),
    ({"search_alg": "grid"}, "search_alg=grid"),  # a loguniform dimension can't be gridded
    ({"scheduler": {"type": "pbt", "perturbation_interval": 1},
      "space": {"model.width": {"choice": [8, 16]}}}, "space.model.width"),  # PBT can't clone across widths
    ({"resources": {"gpus_per_worker": 2}}, "resources.gpus_per_worker"),
    ({"start_timeout_s": 0}, "start_timeout_s must be > 0"),
    ({"start_timeout_s": "3m"}, "start_timeout_s must be a number of seconds"),
    ({"status_every_s": 120}, "status_every_s must be in (0, 60]"),
    ({"scheduler": {"type": "asha", "min_rung_results": 0}}, "scheduler.min_rung_results"),
])
def test_bad_specs_fail_naming_the_key(changes, named):
    with pytest.raises(ConfigError) as err:
        spec_from_dict(_spec(**changes))
    assert named in str(err.value)


def test_vae_metric_check_and_cli_rejects_before_starting(tmp_path, capsys):
    with pytest.raises(ConfigError, match="loss_g.*not reported by model family 'vae'"):
        spec_from_dict(_spec(base="vae-digits", metric="loss_g"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_spec(space={"model.options.beta": {"uniform": [0.5, 2.0]}})))
    assert main(["tune", "--spec", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "space.model.options.beta: model.options.beta means nothing for model family 'sngan'; families that take it: vae" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


def test_shipped_specs_and_their_smoke_variants_are_valid():
    from aigc_ray.tuning.text_sweep import is_text_spec

    # image specs (a text model's spec, modality: text, is tuning/text_sweep.py's: tests/test_text.py)
    shipped = sorted(p for p in Path("tune").glob("*.yaml") if not is_text_spec(p))
    assert {p.stem for p in shipped} >= {"dcgan_asha", "vae_asha", "dcgan_pbt", "sngan_asha", "digits_recipe_asha",
                                           "shapes_recipe_asha"}
    for path in shipped:
        full = load_spec(path)
        smoke = load_spec(path, smoke=True)
        assert full.metric == "fid" and smoke.name == f"{full.name}-smoke"
        assert smoke.num_samples == 4 and smoke.epochs == 2
        assert smoke.base_config().data.image_size == 8
    assert load_spec("tune/dcgan_pbt.yaml").scheduler.type == "pbt"


# --- ASHA's rungs survive a restore (Tune restores trials, not the scheduler) ------------------

def test_asha_rungs_survive_a_restore(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from aigc_ray.tuning.asha import ResumableASHA

    def scheduler():
        s = ResumableASHA(str(tmp_path / "asha_rungs.json"), time_attr="epoch", max_t=4, grace_period=1,
                          reduction_factor=2)
        s.set_search_properties("fid", "min")
        return s

    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
    before = scheduler()
    for trial, fid in zip(trials[:2], (10.0, 50.0)):
        before.on_trial_add(None, trial)
        before.on_trial_result(None, trial, {"epoch": 1, "fid": fid})
    # a fresh scheduler, as Tuner.restore unpickles it, decides on the rung it had recorded:
    # a trial far worse than both is stopped (an empty rung would have let it through)
    after = scheduler()
    after.on_trial_add(None, trials[2])
    assert after.on_trial_result(None, trials[2], {"epoch": 1, "fid": 90.0}) == TrialScheduler.STOP
    # and a trial that was running before the restore keeps its place at the rung
    assert after.on_trial_result(None, trials[0], {"epoch": 2, "fid": 9.0}) == TrialScheduler.CONTINUE


def test_asha_min_rung_results_judges_early_arrivals_again(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from aigc_ray.tuning.asha import ResumableASHA

    def decisions(min_rung_results: int) -> list[str]:
        s = ResumableASHA(str(tmp_path / f"rungs{min_rung_results}.json"), min_rung_results=min_rung_results,
                          time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
        s.set_search_properties("fid", "min")
        trials = {name: SimpleNamespace(trial_id=name) for name in ("t0", "t1", "t2", "t3")}
        for trial in trials.values():
            s.on_trial_add(None, trial)
        reports = [("t0", 1, 50.0), ("t1", 1, 40.0), ("t2", 1, 10.0), ("t0", 2, 45.0), ("t3", 1, 5.0)]
        return [s.on_trial_result(None, trials[t], {"epoch": e, "fid": f}) for t, e, f in reports]

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # Tune's ASHA: t0 and t1 reach the rung first and pass it; t0 trains on whatever comes later
    assert decisions(1) == [go, go, go, go, go]
    # 3 results before the rung stops anyone: t0 is judged again at its next report, and stopped
    # (fid 50 is not in the top third of 50, 40, 10)
    assert decisions(3) == [go, go, go, stop, go]


# --- ASHA: interrupted with Ctrl-C, resumed, best exported ---------------------------------

def _result_lines(experiment: Path) -> dict[str, int]:
    """Reports recorded per trial (the sweep's own record: history/<trial id>.jsonl)."""
    return {p.stem: len(p.read_text().splitlines()) for p in (experiment / "history").glob("*.jsonl")}


@pytest.mark.slow
def test_asha_sweep_interrupted_resumed_and_exported(ray_session, tmp_path, data_root):
    # lr_g 2e-3 learns in one epoch; 1e-6 barely moves from its initialisation. One trial at a
    # time, the good one first: the sweep is interrupted once it has finished, so the two
    # slow trials reach the rung after the resume, and ASHA (keeping the top quarter) stops
    # both after 1 of their 2 epochs only if the resumed scheduler still holds the good
    # trial's score. (Two at a time made the count depend on which of a pair reported first:
    # a slow trial alone at the rung goes on, and CI once saw a single stop.)
    raw = _spec(name="asha", num_samples=1, space={"train.lr_g": {"grid": [2e-3, 1e-6, 1e-6]}},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 4}, max_concurrent_trials=1)
    raw["overrides"]["data.data_root"] = str(data_root)
    spec_path, out = tmp_path / "asha.yaml", tmp_path / "out"
    spec_path.write_text(yaml.safe_dump(raw))
    experiment = out / "asha"

    # a driver process on the session's cluster, interrupted once a trial has finished
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "aigc_ray.cli", "tune", "--spec", str(spec_path), "--out", str(out)],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    finished, lines = [], []
    deadline = time.monotonic() + 400
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[") and line.rstrip().endswith("] finished"):
            finished.append(line[1:line.index("]")])
            break
        assert time.monotonic() < deadline, "no trial finished:\n" + "".join(lines[-30:])
    assert finished, "".join(lines[-30:])
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines[-20:]) + stderr[-3000:] + stdout
    assert "sweep interrupted" in stderr
    before = _result_lines(experiment)
    assert set(finished) <= set(before)

    # resume: finished trials are kept as they are, the rest run to the end
    assert main(["tune", "--spec", str(spec_path), "--out", str(out), "--resume"]) == 0
    after = _result_lines(experiment)
    assert len(after) == 3
    for trial in finished:
        assert after[trial] == before[trial]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["trial_id"]: r for r in summary["trials"]}
    assert all(r["status"] == "TERMINATED" and r["best"] is not None for r in rows.values())
    good = [r for r in rows.values() if r["params"]["train.lr_g"] == 2e-3]
    assert len(good) == 1 and summary["best"]["trial_id"] == good[0]["trial_id"]
    stopped = [r for r in rows.values() if r["stopped_early"]]
    why = json.dumps({"trials": summary["trials"], "rungs": json.loads((experiment / "asha_rungs.json").read_text())},
                     indent=1, default=str)
    assert finished == [good[0]["trial_id"]], why  # the grid's order: the good trial ran first
    assert len(stopped) == 2 and all(r["scored_epochs"] == 1 for r in stopped), why
    assert not good[0]["stopped_early"] and good[0]["scored_epochs"] == 2
    assert summary["trial_epochs"] < 6, why  # fewer than all three trials' 2 epochs: the stops saved epochs
    # no trial's workers outlive it: ASHA's stops kill each trial's Train controller with it, and
    # the sweep releases the placement group the trial recorded as soon as the trial ends
    from ray.util import placement_group_table

    records = [json.loads(p.read_text())["placement_group"] for p in (experiment / "train" / "placement").glob("*.json")]
    assert len(records) == 3
    held = [pg for pg in records if placement_group_table().get(pg, {}).get("state") not in (None, "REMOVED")]
    assert not held

    # the exported best checkpoint: a quality card, and `aigc-ray generate` loads it
    best = out / "best"
    card = json.loads((best / "card.json").read_text())
    assert card["metrics"]["fid"] == pytest.approx(summary["best"]["best"], rel=1e-6)
    assert main(["generate", "--checkpoint", str(best), "--num-images", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- PBT: the trial's (mutated) hyperparameters are in force from the first start ----------

@pytest.mark.slow
def test_pbt_applies_mutated_hyperparameters(ray_session, tmp_path, data_root):
    from aigc_ray.tuning.sweep import read_history, run_sweep

    raw = _spec(name="pbt", num_samples=2, space={"train.lr_g": {"loguniform": [1e-4, 3e-3]}},
                scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                           "resample_probability": 0.0, "synch": True})
    raw["overrides"]["data.data_root"] = str(data_root)
    outcome = run_sweep(spec_from_dict(raw), out=str(tmp_path / "out"))
    assert not outcome.interrupted and len(outcome.rows) == 2
    experiment = Path(outcome.experiment)
    changed = 0
    for trial_dir in sorted(p for p in experiment.iterdir() if (p / "params.json").is_file()):
        rows = read_history(str(experiment / "history"), trial_dir.name)
        assert [r["epoch"] for r in rows] == [1, 2]
        for row in rows:
            # the learning rate the optimizer trained with (read from the segment's checkpoint) =
            # the trial's config at that time. (Not from the trial's checkpoint_* dirs: Tune may
            # reuse a name after a PBT restore, overwriting an earlier report's checkpoint.)
            assert row["trained_lr_g"] == pytest.approx(row["config"]["space"]["train.lr_g"])
        changed += rows[0]["config"]["space"]["train.lr_g"] != rows[1]["config"]["space"]["train.lr_g"]
    assert changed == 1  # the worse trial exploited the better one and trained on at a perturbed rate
    assert outcome.exported and (Path(outcome.exported) / "model.safetensors").is_file()
