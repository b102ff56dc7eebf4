"""Quality at equal step budgets: the seed recipe, the default DCGAN, WGAN-GP and the VAE on
digits and shapes, each trained for the same number of generator steps and scored by the
domain FID (the best checkpoint `aigc-ray train` names, and the last one), in one run.

    python bench/quality.py [--steps 3000] [--quick] [--datasets digits,shapes]
                            [--models seed-recipe,dcgan,wgan-gp,vae] [--throughput] [--num-samples N]

--quick: 400 steps, 500 samples, digits only. --throughput also trains dcgan-digits with an
evaluation every epoch (in the background, the default, and in the foreground), with only a
checkpoint every epoch, and with evaluation off, and compares steady-state images/s (target:
<= 10% drop); `--models '' --throughput` measures only that. Prints a table and writes bench/results/quality.json (or --out).

Models: seed-recipe, dcgan (the old default: dcgan family, no DiffAugment), default (the shipped
dcgan-<dataset> config: the sngan recipe on digits, the vae recipe on shapes), wgan-gp, vae.
Targets (issue 11): default fid/floor <= 1.5 on digits, <= 5 on shapes with class coverage 1.0,
VAE <= 3, each better than the seed recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aigc_ray.config import load_config  # noqa: E402
from aigc_ray.eval import evaluate_checkpoint  # noqa: E402

CONFIGS = {"seed-recipe": "seed-recipe", "default": "dcgan-{d}", "dcgan": "dcgan-{d}", "wgan-gp": "wgan-gp-digits",
           "vae": "vae-digits"}
# "dcgan": the shipped dcgan-<dataset> config as it was before it moved to the sngan recipe (the
# old default): the dcgan family, no DiffAugment, Adam 2e-4 / 2e-4, betas 0.5 / 0.999
OLD_DEFAULT = {"model.family": "dcgan", "model.options.diffaugment": "", "train.lr_g": 2e-4, "train.lr_d": 2e-4,
               "train.beta1": 0.5, "train.beta2": 0.999}
# on shapes the shipped config is now a VAE: what the old dcgan-shapes set besides the family
OLD_SHAPES = {"model.latent_dim": 64, "model.width": 32, "data.horizontal_flip": True, "train.ema_decay": 0.999,
              "train.lr_decay_start": 1.0}
SHAPES_DATA = {"data.dataset": "shapes", "data.image_size": 32, "data.channels": 3, "data.rotation_degrees": 0.0,
               "data.horizontal_flip": True, "model.image_size": 32, "model.channels": 3}
REPORTED = ("fid", "fid_floor", "fid_ratio", "kid", "kid_floor", "precision", "recall", "inception_score",
            "class_coverage", "mode_entropy", "class_accuracy")


def experiment(model: str, dataset: str, steps: int, num_samples: int, root: str, name: str):
    cfg = load_config(CONFIGS[model].format(d=dataset))
    if model == "dcgan":
        cfg = cfg.with_overrides(OLD_DEFAULT | (OLD_SHAPES if dataset == "shapes" else {}))
    overrides = {"train.max_steps": steps, "train.epochs": 10**6, "train.out": root, "train.name": name,
                 "eval.num_samples": num_samples, "train.checkpoint_every": 10**9, "train.sample_every": 10**6}
    if dataset == "shapes" and cfg.data.dataset != "shapes":
        overrides |= SHAPES_DATA
    cfg = cfg.with_overrides(overrides)
    # about 6 evaluations over the budget, so "best" has something to choose from
    steps_per_epoch = max(1, int(cfg.data.num_shapes * 0.8 if dataset == "shapes" else 1437) // cfg.train.batch_size)
    every = max(1, steps // steps_per_epoch // 6)
    return cfg.with_overrides({"eval.every_epochs": every, "train.checkpoint_every_epochs": every})


def run_one(cfg) -> dict:
    from aigc_ray.train.loop import run_training

    start = time.perf_counter()
    outcome = run_training(cfg)
    wall = time.perf_counter() - start
    best = outcome.best_metrics or {}
    last = evaluate_checkpoint(outcome.latest, num_samples=cfg.eval.num_samples, seed=cfg.eval.seed, write_card=False,
                               own_checkpoint=True)
    history = [json.loads(line) for line in Path(outcome.run_dir, "metrics.jsonl").read_text().splitlines()]
    return {"config": cfg.to_dict(), "train_wall_s": round(wall, 1), "steps": history[-1]["step"] if history else None,
            "epochs": len(history), "best_epoch": best.get("epoch"),
            "best": {k: best.get(k) for k in REPORTED}, "last": {k: last.get(k) for k in REPORTED},
            "fid_by_epoch": {h["epoch"]: h["fid"] for h in history if "fid" in h},
            "checkpoint": outcome.checkpoint}


def throughput(steps: int, root: str) -> dict:
    """dcgan-digits images/s with an evaluation every epoch (as a background job, the default,
    and on equal footing with training) vs none (epoch 1, with Ray Data's first read, excluded;
    median of the rest), and each run's wall time, which includes waiting for the evaluations
    still queued when training ends."""
    from aigc_ray.train.loop import run_training

    out: dict = {}
    # an evaluated epoch needs a checkpoint: "checkpoint_only" writes one every epoch without
    # evaluating it, to tell the checkpoint's cost from the evaluation's
    runs = {"eval_off": {"eval.enabled": False},
            "checkpoint_only": {"eval.enabled": False, "train.checkpoint_every_epochs": 1},
            "eval_every_epoch_foreground": {"eval.background": False},
            "eval_every_epoch": {},
            "eval_off_again": {"eval.enabled": False}}
    for label, overrides in runs.items():
        cfg = load_config("dcgan-digits").with_overrides({
            "train.max_steps": steps, "train.epochs": 10**6, "train.out": root, "train.name": f"throughput-{label}",
            "eval.every_epochs": 1, "train.checkpoint_every": 10**9} | overrides)
        started = time.perf_counter()
        outcome = run_training(cfg)
        wall = time.perf_counter() - started
        rates = [json.loads(line)["images_per_s"] for line in Path(outcome.run_dir, "metrics.jsonl").read_text().splitlines()]
        out[label] = round(statistics.median(rates[1:] or rates), 1)
        out[f"{label}_wall_s"] = round(wall, 1)
        print(f"throughput {label}: {out[label]} img/s, {wall:.0f} s", file=sys.stderr, flush=True)
    off = (out["eval_off"] + out["eval_off_again"]) / 2
    out["drop_checkpoint_only"] = round(1 - out["checkpoint_only"] / off, 4)
    out["drop_foreground"] = round(1 - out["eval_every_epoch_foreground"] / off, 4)
    out["drop"] = round(1 - out["eval_every_epoch"] / off, 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="generator steps per model (default 3000; --quick 400)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", help="comma-separated: digits,shapes (default both; --quick: digits)")
    ap.add_argument("--models", default="seed-recipe,dcgan,default,wgan-gp,vae",
                    help="comma-separated; empty ('') with --throughput measures only the throughput")
    ap.add_argument("--num-samples", type=int, help="images per evaluation (default 1000; --quick 500)")
    ap.add_argument("--throughput", action="store_true", help="also measure images/s with eval on vs off")
    ap.add_argument("--throughput-steps", type=int, default=600)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    steps = args.steps or (400 if args.quick else 3000)
    samples = args.num_samples or (500 if args.quick else 1000)
    datasets = (args.datasets or ("digits" if args.quick else "digits,shapes")).split(",")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    from aigc_ray.train.loop import init_ray

    init_ray(None, 1)
    results: dict = {"steps": steps, "num_samples": samples, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                     "runs": {}}
    with tempfile.TemporaryDirectory(prefix="aigc-quality-") as root:
        for dataset in datasets:
            for model in filter(None, args.models.split(",")):
                key = f"{model}/{dataset}"
                print(f"== {key}: {steps} generator steps", file=sys.stderr, flush=True)
                results["runs"][key] = run_one(experiment(model, dataset, steps, samples, root, key.replace("/", "-")))
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))  # partial results survive a kill
        if args.throughput:
            results["throughput"] = throughput(args.throughput_steps, root)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"{'model/dataset':<22}{'fid':>9}{'floor':>8}{'fid/floor':>10}{'kid':>9}{'last fid/fl':>12}{'best ep':>8}"
          f"{'train s':>9}")
    for key, r in results["runs"].items():
        b, last = r["best"], r["last"]
        ratio = (last["fid"] / last["fid_floor"]) if last.get("fid") and last.get("fid_floor") else float("nan")
        print(f"{key:<22}{b['fid'] or float('nan'):>9.3f}{b['fid_floor'] or float('nan'):>8.3f}"
              f"{b['fid_ratio'] or float('nan'):>10.2f}{b['kid'] or float('nan'):>9.4f}{ratio:>12.2f}"
              f"{str(r['best_epoch']):>8}{r['train_wall_s']:>9.0f}")
    if "throughput" in results:
        t = results["throughput"]
        print(f"throughput dcgan-digits img/s: eval off {t['eval_off']}/{t['eval_off_again']}; eval every epoch in "
              f"the background {t['eval_every_epoch']} (drop {t['drop']:.1%}; target <= 10%), in the foreground "
              f"{t['eval_every_epoch_foreground']} (drop {t['drop_foreground']:.1%}); checkpoints alone "
              f"{t['checkpoint_only']} (drop {t['drop_checkpoint_only']:.1%}); wall s off/background/foreground: "
              f"{t['eval_off_wall_s']}/{t['eval_every_epoch_wall_s']}/{t['eval_every_epoch_foreground_wall_s']}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
