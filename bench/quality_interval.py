"""Can the quality instrument tell models apart? (issue 26)

Scores checkpoints with `aigc_ray.eval.evaluate_checkpoint` (eval.draws draws each) at several eval
seeds and writes, per checkpoint and seed, the FID / floor ratio with its 95% interval; then checks
  - each ratio interval's half-width is within 10% of its mean (the instrument is precise),
  - the seeds agree: every seed's mean lies inside every other seed's interval (or within 10%),
  - the checkpoints' intervals do not overlap (it separates a better model from a worse one),
  - each is far from its untrained ceiling.

    python bench/quality_interval.py --checkpoint default=runs/a/checkpoint_X --checkpoint half=runs/b/checkpoint_Y \
        --seeds 0 1 2 --out bench/results/quality_interval.json

No Ray; a checkpoint's dataset is found under --data-root as `aigc-ray eval` finds it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aigc_ray.eval import evaluate_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="NAME=PATH, best model first")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, default=None, help="default: each checkpoint's eval.draws")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="bench/results/quality_interval.json")
    args = ap.parse_args()
    results: dict = {}
    for spec in args.checkpoint:
        name, path = spec.split("=", 1)
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = evaluate_checkpoint(path, seed=seed, draws=args.draws, write_card=False, data_root=args.data_root)
            card = r["card"]
            runs.append({"seed": seed, "fid": r["fid"], "fid_interval": [r["fid_lo"], r["fid_hi"]],
                         "floor": r["fid_floor"], "floor_interval": [r["fid_floor_lo"], r["fid_floor_hi"]],
                         "ratio": r["fid_ratio"], "ratio_interval": [r["fid_ratio_lo"], r["fid_ratio_hi"]],
                         "ceiling_ratio": r["fid_ceiling"] / r["fid_floor"],
                         "near_copies": r.get("near_copies"), "draws": card["protocol"]["draws"],
                         "num_samples": card["protocol"]["num_samples"], "eval_s": round(time.perf_counter() - t0, 1)})
            print(f"{name} seed {seed}: ratio {r['fid_ratio']:.3f} [{r['fid_ratio_lo']:.3f}, {r['fid_ratio_hi']:.3f}] "
                  f"floor {r['fid_floor']:.3f} ceiling {runs[-1]['ceiling_ratio']:.0f}x ({runs[-1]['eval_s']} s)", flush=True)
        means = [x["ratio"] for x in runs]
        half_widths = [(x["ratio_interval"][1] - x["ratio_interval"][0]) / 2 / x["ratio"] for x in runs]
        agree = all(lo * 0.9 <= m <= hi * 1.1 for m in means for x in runs for lo, hi in [x["ratio_interval"]])
        results[name] = {"checkpoint": path, "runs": runs, "ratio": round(sum(means) / len(means), 3),
                         "ratio_seed_spread": [round(min(means), 3), round(max(means), 3)],
                         "max_relative_half_width": round(max(half_widths), 4), "seeds_agree": agree}
    names = list(results)
    separated = all(max(x["ratio_interval"][1] for x in results[a]["runs"]) <
                    min(x["ratio_interval"][0] for x in results[b]["runs"]) for a, b in zip(names, names[1:]))
    summary = {"checkpoints": results, "separated_in_order": separated,
               "precise": all(r["max_relative_half_width"] <= 0.10 for r in results.values()),
               "seeds_agree": all(r["seeds_agree"] for r in results.values()),
               "machine": "shared 2-core CPU VM, no GPU", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "checkpoints"}))


if __name__ == "__main__":
    main()
