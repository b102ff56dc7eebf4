"""ASHA vs FIFO on digits: the same search space, search seed and trials, scored by domain FID.

Reports the best FID each reached and the trial-epochs each spent, and their ratios
(target: ASHA within 10% of FIFO's best FID with <= 40% of its trial-epochs), as JSON in
bench/results/tune_efficiency.json.

    python bench/tune_efficiency.py --size tiny     # 8 px, a few trials: minutes on a laptop CPU
    python bench/tune_efficiency.py --size small    # 16 px, 12 trials x 8 epochs
    python bench/tune_efficiency.py --size full     # 16 px, 27 trials x 27 epochs

"trial_epochs" counts the epochs trained; "scored_trial_epochs" counts up to each trial's last
scored epoch. ASHA/FIFO trials score inline (before the epoch's report), so ASHA stops a trial
at its rung and the two agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

SIZES = {  # image size, width, latent, epochs, trials, grace period, reduction factor, eval samples
    "tiny": dict(image_size=8, width=8, latent=8, epochs=4, trials=6, grace=1, rf=3, eval_samples=128),
    "small": dict(image_size=16, width=32, latent=32, epochs=8, trials=12, grace=1, rf=3, eval_samples=500),
    "full": dict(image_size=16, width=64, latent=64, epochs=27, trials=27, grace=1, rf=3, eval_samples=1000),
}


def build_spec(size: dict, scheduler: str, seed: int, data_root: str | None, concurrency: int,
               min_rung_results: int = 1):
    from aigc_ray.tuning.spec import spec_from_dict

    overrides = {"data.image_size": size["image_size"], "model.image_size": size["image_size"],
                 "model.width": size["width"], "model.latent_dim": size["latent"],
                 "train.checkpoint_every": 10**6, "train.sample_every": 10**6}
    if data_root:
        overrides["data.data_root"] = data_root
    raw = {"name": f"bench-{scheduler}", "base": "dcgan-digits", "overrides": overrides, "metric": "fid",
           "epochs": size["epochs"], "num_samples": size["trials"], "seed": seed, "eval_samples": size["eval_samples"],
           "max_concurrent_trials": concurrency,
           "space": {"train.lr_g": {"loguniform": [3e-5, 3e-3]}, "train.lr_d": {"loguniform": [3e-5, 3e-3]},
                     "train.beta1": {"choice": [0.0, 0.5]}, "train.batch_size": {"choice": [32, 64]}},
           "scheduler": {"type": scheduler, "grace_period": size["grace"], "reduction_factor": size["rf"]}}
    if scheduler == "asha":
        raw["scheduler"]["min_rung_results"] = min_rung_results
        raw["name"] = f"bench-asha-min{min_rung_results}" if min_rung_results > 1 else raw["name"]
    return spec_from_dict(raw)


def run(scheduler: str, args, size: dict, out: str, min_rung_results: int = 1) -> dict:
    from aigc_ray.tuning.sweep import format_table, run_sweep

    spec = build_spec(size, scheduler, args.seed, args.data_root, args.concurrency, min_rung_results)
    started = time.perf_counter()
    outcome = run_sweep(spec, out=str(Path(out, spec.name)), export=False)
    wall = time.perf_counter() - started
    print(format_table(outcome), file=sys.stderr)
    from aigc_ray.tuning.sweep import read_history

    history = str(Path(outcome.experiment, "history"))
    # the best epoch's own 95% interval (eval draws; protocol 2) and its ratio to the floor
    best_row = next((h for h in read_history(history, outcome.best.trial_id) if h.get("fid") == outcome.best.best),
                    {}) if outcome.best else {}
    return {"best_fid": outcome.best.best if outcome.best else None,
            "best_fid_interval": [best_row.get("fid_lo"), best_row.get("fid_hi")],
            "best_fid_ratio": best_row.get("fid_ratio"),
            "best_trial": dataclasses.asdict(outcome.best) if outcome.best else None,
            "trial_epochs": outcome.trial_epochs,
            "scored_trial_epochs": sum(r.scored_epochs for r in outcome.rows),
            "trials_stopped_early": sum(r.stopped_early for r in outcome.rows),
            "trials": len(outcome.rows), "wall_s": round(wall, 1),
            "per_trial": [{"params": r.params, "best_fid": r.best, "epochs": r.epochs, "scored_epochs": r.scored_epochs,
                           "stopped_early": r.stopped_early,
                           "fid_by_epoch": {int(h["epoch"]): h["fid"] for h in read_history(history, r.trial_id)
                                            if h.get("fid") is not None and float(h["epoch"]).is_integer()}}
                          for r in outcome.rows]}


def rung_signal(fifo: dict) -> dict[int, float]:
    """How well each epoch's FID predicts a trial's best FID, from the FIFO sweep (every trial
    ran every epoch): Spearman's rank correlation across trials, per epoch. A rung at an epoch
    whose correlation is low stops the wrong trials; the grace period should be the first
    epoch where it is high."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    trials = [t for t in fifo["per_trial"] if t["best_fid"] is not None and t["fid_by_epoch"]]
    epochs = sorted({e for t in trials for e in t["fid_by_epoch"]})
    out = {}
    for epoch in epochs:
        pairs = [(t["fid_by_epoch"][epoch], t["best_fid"]) for t in trials if epoch in t["fid_by_epoch"]]
        if len(pairs) >= 3:
            at, best = torch.tensor(pairs, dtype=torch.float64).T
            out[epoch] = round(float(spearman_corrcoef(at, best)), 3)
    return out


def _overlap(a: list, b: list) -> bool | None:
    if None in (*a, *b):
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--trials", type=int, help="override the size's number of trials")
    p.add_argument("--epochs", type=int, help="override the size's epoch budget per trial")
    p.add_argument("--seed", type=int, default=0, help="search seed (the same for both schedulers)")
    p.add_argument("--concurrency", type=int, default=0, help="trials at once (0 = what the cluster fits)")
    p.add_argument("--data-root", help="where the digits are prepared (default: the config's)")
    p.add_argument("--min-rung-results", type=int, default=0,
                   help="also run ASHA with scheduler.min_rung_results=N (a rung stops no one before N results)")
    p.add_argument("--out", default="bench/results/tune_efficiency.json")
    args = p.parse_args()
    size = dict(SIZES[args.size])
    size.update({k: v for k, v in {"trials": args.trials, "epochs": args.epochs}.items() if v})

    import ray

    # logical CPUs: each concurrent trial holds one for its worker and needs one for its data
    # reads and evaluations (they mostly wait on each other, so this oversubscribes little)
    # (a trial's workers' placement group is released by the sweep when the trial ends:
    # aigc_ray/tuning/watch.py; Train's own cleaner needs the dashboard and one Ray per machine)
    ray.init(num_cpus=max(4, 2 * (args.concurrency or 2)))
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as work:
        fifo = run("fifo", args, size, work)
        asha = run("asha", args, size, work)
        asha_min = run("asha", args, size, work, args.min_rung_results) if args.min_rung_results > 1 else None
    fid_ratio = asha["best_fid"] / fifo["best_fid"] if asha["best_fid"] and fifo["best_fid"] else None
    epoch_ratio = asha["trial_epochs"] / fifo["trial_epochs"]
    result = {
        "size": args.size, "settings": size, "seed": args.seed,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.python_version()}",
        "fifo": fifo, "asha": asha,
        "asha_over_fifo_best_fid": fid_ratio, "asha_over_fifo_trial_epochs": epoch_ratio,
        "asha_over_fifo_scored_trial_epochs": asha["scored_trial_epochs"] / fifo["scored_trial_epochs"],
        "target": "ASHA best FID within 10% of FIFO's (ratio <= 1.10) with <= 40% of its trial-epochs",
        "target_met": bool(fid_ratio is not None and fid_ratio <= 1.10 and epoch_ratio <= 0.40),
        # the two bests' intervals overlap: their difference is within the evaluation's noise
        "best_fid_intervals_overlap": _overlap(asha["best_fid_interval"], fifo["best_fid_interval"]),
        "fifo_rank_correlation_of_epoch_fid_with_best": rung_signal(fifo),
    }
    if asha_min:
        min_fid = asha_min["best_fid"] / fifo["best_fid"] if asha_min["best_fid"] and fifo["best_fid"] else None
        min_epochs = asha_min["trial_epochs"] / fifo["trial_epochs"]
        result |= {f"asha_min{args.min_rung_results}": asha_min, "asha_min_over_fifo_best_fid": min_fid,
                   "asha_min_over_fifo_trial_epochs": min_epochs,
                   "asha_min_target_met": bool(min_fid is not None and min_fid <= 1.10 and min_epochs <= 0.40)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()
                      if k.endswith(("_best_fid", "_trial_epochs", "target_met", "_with_best", "_overlap"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
