"""Ray Train overhead: steady-state epoch time of the Ray Train path (1 worker) against a
plain PyTorch loop with the same model, batch size, data and thread count, in one run.

    python bench/train_overhead.py [--config dcgan-digits] [--epochs 12] [--repeats 2]

Both paths drive the same Engine (aigc_ray/train/engine.py), so the difference is Ray:
Ray Data ingest (first epoch), the per-epoch report barrier, worker process and DDP
wrapper. Epoch 1 is excluded from both (Ray Data's first pass and the plain loop's warm-up);
the statistic is the median of the remaining epochs. Prints the ratio (target <= 1.05) and
writes bench/results/train_overhead.json.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aigc_ray.config import load_config  # noqa: E402
from aigc_ray.data.pipeline import ensure_prepared, load_split  # noqa: E402
from aigc_ray.train.engine import Engine  # noqa: E402


def plain_epochs(cfg, threads: int) -> list[float]:
    """The same Engine in this process: data in memory, a fresh permutation per epoch."""
    torch.set_num_threads(threads)
    images, labels = load_split(ensure_prepared(cfg.data, cfg.train.seed), "train")
    engine = Engine(cfg, torch.device("cpu"))
    bs, times = cfg.train.batch_size, []
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(images) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            out = engine.train_batch(images[idx], labels[idx])
        float(next(iter(out.values())))  # same end-of-epoch sync the Ray loop does
        times.append(time.perf_counter() - start)
    return times


def ray_epochs(cfg, threads: int) -> list[float]:
    from aigc_ray.train.loop import build_trainer, init_ray

    init_ray(None, 1)
    trainer, run_dir = build_trainer(cfg.with_overrides({"train.cpus_per_worker": threads}))
    result = trainer.fit()
    if result.error:
        raise result.error
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch_time_s"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="dcgan-digits")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/Ray this many times")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-overhead-")
    base = load_config(args.config).with_overrides({
        "train.epochs": args.epochs, "train.out": tmp, "train.checkpoint_every": 10**9,
        "train.checkpoint_every_epochs": 10**6, "train.sample_every": 10**6, "eval.enabled": False,
        "data.data_root": os.path.join(tmp, "data")})
    plain, ray_ = [], []
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both
        plain += plain_epochs(base, args.threads)[1:]
        ray_ += ray_epochs(base.with_overrides({"train.name": f"overhead-{r}"}), args.threads)[1:]
    p, q = statistics.median(plain), statistics.median(ray_)
    result = {"config": args.config, "epochs": args.epochs, "repeats": args.repeats, "threads": args.threads,
              "plain_epoch_s": p, "ray_epoch_s": q, "ratio": q / p, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "device": "cpu",
              "plain_all": plain, "ray_all": ray_}
    print(f"{'path':<22}{'median epoch s':>16}{'epochs':>8}")
    print(f"{'plain PyTorch':<22}{p:>16.3f}{len(plain):>8}")
    print(f"{'Ray Train, 1 worker':<22}{q:>16.3f}{len(ray_):>8}")
    print(f"ratio Ray/plain = {q / p:.3f}  (target <= 1.05)")
    out = Path(__file__).parent / "results" / "train_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
