"""Real 32 px data, measured: a shipped config trained by `aigc-ray train` within a wall-clock budget, its best
checkpoint scored by `aigc-ray eval`, and the real and generated grids side by side.

Nothing can be downloaded here, so the data is a stand-in written in torchvision's own formats
(aigc_ray/data/standins.py): crops of scikit-learn's two bundled photos at five scales as CIFAR-10 python
batches (6,000 crops, 1 in 6 held out as test_batch; 10 classes = photo x scale), and the bundled digits drawn
at MNIST's 28 px as MNIST / Fashion-MNIST idx files. The `cifar10` / `mnist` sources read them from
--data-root exactly as they read the real files.

    python bench/real32.py --make-data /tmp/aigc-real32
    flock /tmp/aigc-ray-ray.lock python bench/real32.py --data-root /tmp/aigc-real32 --config vae-cifar10 \\
        --epochs 20 --budget-s 600 --out bench/results/real32.json

--epochs 20 on the stand-in's 4,988 training images (after de-duplication) is the step count of vae-cifar10's default 2 epochs of
CIFAR-10's 50,000 (1,540 vs 1,562 steps of 64: 77 a stand-in epoch). Writes the results JSON (--out) and the grids PNG beside it.
The machine may be shared: the JSON records the wall time, this run's CPU time and how busy the whole machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, per_class: int = 600) -> dict:
    from aigc_ray.data import standins as st

    images, labels, names = st.photo_crops(per_class)
    test = st.iid_test_mask(len(images), st.CIFAR_TEST_FRACTION)
    st.write_cifar_files(root, images, labels, test, names)
    digits, digit_labels = st.upscaled_digits()
    held_out = np.arange(len(digits)) % st.MNIST_TEST_EVERY == 0
    for dataset_class in ("MNIST", "FashionMNIST"):
        st.write_mnist_files(root, digits, digit_labels, held_out, dataset_class)
    return {"cifar10": {"what": "crops of scikit-learn's china.jpg and flower.jpg at sides "
                                f"{list(st.CROP_SIDES)} px, box-filtered to 32x32; class = photo x side",
                        "classes": names, "train": int((~test).sum()), "test": int(test.sum())},
            "mnist": {"what": "scikit-learn's 8x8 digits, bicubic to 20x20 in a 28x28 frame (both MNIST/ and "
                              "FashionMNIST/)", "train": int((~held_out).sum()), "test": int(held_out.sum())}}


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _tree_cpu(root_pid: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds (user + system) of every live process descended from root_pid into ``seen``
    (by pid, the latest reading): Ray's workers are the raylet's children, not this process's, so
    os.times() never counts them."""
    parents, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    for pid in cpu:
        p = pid
        while p > 1 and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            seen[pid] = cpu[pid]


def _run(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    before, busy0, t0 = os.times(), _machine_busy(), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen: dict[int, float] = {}
    with ThreadPoolExecutor(2) as pool:  # drain both pipes while sampling the process tree's CPU time
        out, err = pool.submit(proc.stdout.read), pool.submit(proc.stderr.read)
        while proc.poll() is None:
            _tree_cpu(proc.pid, seen)
            if time.monotonic() - t0 > timeout:
                proc.kill()
            time.sleep(1.0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.result(), err.result())
    wall = time.monotonic() - t0
    after, busy1 = os.times(), _machine_busy()
    waited = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0)
    return result, {"wall_s": round(wall, 1), "tree_cpu_s": round(sum(seen.values()), 1),
                    "waited_children_cpu_s": round(waited, 1), "machine_busy": round(busy, 3), "cores": os.cpu_count()}


def score(best: str, root: Path, out: Path) -> dict:
    """`aigc-ray eval` of the checkpoint (the eval in the tree now) and the real | generated grids beside ``out``."""
    evaluate = [sys.executable, "-m", "aigc_ray.cli", "eval", "--checkpoint", best, "--data-root", str(root), "--json"]
    proc, timing = _run(evaluate, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"aigc-ray eval failed:\n{proc.stderr[-3000:]}")
    card = json.loads(proc.stdout)
    grids = out.with_suffix(".png")
    grid_proc = subprocess.run([sys.executable, str(ROOT / "bench/real_vs_generated.py"), "--checkpoint", best,
                                "--out", str(grids), "--rows", "8"], capture_output=True, text=True, cwd=ROOT)
    flat = _flatten(card)
    summary = {k: v for k, v in flat.items() if "fid" in k and isinstance(v, int | float)}  # card/1 or /2
    return {"eval": {"timing": timing, "card_format": card.get("format"), "summary": summary, "card": card},
            "grids": (_shown(grids) if grid_proc.returncode == 0
                      else f"failed: {grid_proc.stderr[-300:]}"),
            "grid_output": grid_proc.stdout.strip()[-500:]}


def _shown(path: Path) -> str:
    """The path relative to the repository when it lies inside (results kept under bench/results), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-data", metavar="ROOT", help="write the stand-ins under ROOT and exit")
    p.add_argument("--data-root", help="where the stand-ins are (and the prepared copy is cached)")
    p.add_argument("--config", default="vae-cifar10")
    p.add_argument("--epochs", type=int, help="override the config's epochs (see above)")
    p.add_argument("--set", action="append", default=[], help="more `aigc-ray train --set` overrides")
    p.add_argument("--budget-s", type=float, default=600.0, help="the wall-clock budget the training must meet")
    p.add_argument("--out", default=str(ROOT / "bench/results/real32.json"))
    p.add_argument("--runs", default="runs", help="aigc-ray train --out")
    p.add_argument("--keep-cache", action="store_true", help="reuse a prepared copy (default: prepare afresh, timed)")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score the best checkpoint of --out's run again with the eval in the tree now "
                        "(its card and grids replaced, the training figures kept)")
    args = p.parse_args()
    if args.make_data:
        print(json.dumps(make_data(Path(args.make_data)), indent=2))
        return 0
    if args.rescore:
        result = json.loads(Path(args.out).read_text())
        result.update(score(result["best_checkpoint"], Path(result["data"]["root"]), Path(args.out).resolve()))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["eval"]["summary"], indent=2))
        return 0
    root = Path(args.data_root)
    if not args.keep_cache:  # the budget includes preparing the data and training its feature net
        shutil.rmtree(root / "prepared", ignore_errors=True)
    name = f"real32-{args.config}-{time.strftime('%Y%m%d-%H%M%S')}"
    train = [sys.executable, "-m", "aigc_ray.cli", "train", "--config", args.config, "--data-root", str(root),
             "--name", name, "--out", args.runs]
    train += (["--epochs", str(args.epochs)] if args.epochs else []) + [a for s in args.set for a in ("--set", s)]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    proc, timing = _run(train, timeout=args.budget_s * 3)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    best = proc.stdout.strip().splitlines()[-1].strip()
    from aigc_ray.config import load_config
    from aigc_ray.data.pipeline import prepared_dir

    cfg = load_config(args.config).with_overrides({"data.data_root": str(root)})
    prepared = Path(prepared_dir(cfg.data, cfg.train.seed))
    manifest = json.loads((prepared / "manifest.json").read_text())
    result = {
        "started": started, "config": args.config, "command": " ".join(train[2:]).replace("aigc_ray.cli", "aigc-ray"),
        "data": {"root": str(root), "source": "stand-in (aigc_ray/data/standins.py, bench/real32.py --make-data)",
                 "counts": manifest.get("counts"), "split": manifest.get("split")},
        "train": timing | {"within_budget": timing["wall_s"] <= args.budget_s, "budget_s": args.budget_s,
                           "output_tail": proc.stdout.strip().splitlines()[-6:]},
        "best_checkpoint": best,
        "note": "measured on a machine shared with other engineers' work: machine_busy is the whole machine's "
                "CPU use over the run (1.0 = both cores busy all the time), tree_cpu_s this run's own (every process "
                "it started, Ray's workers included, sampled each second)",
    }
    result.update(score(best, root, Path(args.out).resolve()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("train", "best_checkpoint")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
