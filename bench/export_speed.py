"""Embedded export speed: ONNX Runtime on CPU vs the in-process PyTorch pipeline, side by side.

    python bench/export_speed.py [--configs dcgan-digits vae-digits seed-recipe] [--batch 64] [--seconds 5]
                                 [--threads N] [--checkpoint PATH ...]

For each model (default: freshly initialised generators of the shipped configs; the weights do not
change the cost), both paths do the whole seeds -> uint8 images job for batches of --batch seeds:
  (a) GeneratorPipeline.generate (PyTorch, eval mode, inference_mode), torch.set_num_threads(N);
  (b) examples/offline_generate.py's OfflineGenerator.generate on the exported ONNX file
      (onnxruntime CPUExecutionProvider, intra_op_num_threads=N): the same latent rule, then the graph.
Rounds alternate (a) and (b) so machine noise hits both alike; images/s is the median of the rounds.
Prints one line per model with the ratio (b)/(a) and writes bench/results/export_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def make_checkpoint(path: Path, config: str) -> str:
    from aigc_ray.config import load_config
    from aigc_ray.models import build_generator
    from aigc_ray.models.checkpoint import save_checkpoint

    cfg = load_config(config)
    torch.manual_seed(0)
    save_checkpoint(path, experiment=cfg, served_state=build_generator(cfg.model).state_dict(), step=0, epoch=0,
                    ema=True, dataset={})
    return str(path)


def images_per_s(generate, batch: int, seconds: float, rounds: int) -> list[float]:
    """`rounds` timings of `generate(seeds)` repeated for ~seconds/rounds each; images/s per round."""
    out = []
    for r in range(rounds):
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / rounds:
            generate(list(range(r * 10**6 + done, r * 10**6 + done + batch)))
            done += batch
        out.append(done / (time.perf_counter() - start))
    return out


def bench_one(name: str, checkpoint: str, batch: int, seconds: float, threads: int, tmp: Path) -> dict:
    from offline_generate import OfflineGenerator

    from aigc_ray.export import export_checkpoint
    from aigc_ray.pipeline import GeneratorPipeline

    pipe = GeneratorPipeline.from_checkpoint(checkpoint)
    onnx_path = tmp / f"{pipe.version}.onnx"
    export_checkpoint(checkpoint, "onnx", onnx_path)
    offline = OfflineGenerator(str(onnx_path), threads=threads)
    labels = [0] if pipe.num_classes else None
    torch_gen, onnx_gen = (lambda s: pipe.generate(s, labels)), (lambda s: offline.generate(s, labels))
    for gen in (torch_gen, onnx_gen):  # warm-up: allocator, ORT's arena, oneDNN kernels
        gen(list(range(batch)))
    torch_rates, onnx_rates = [], []
    for _ in range(5):  # alternate so a noisy neighbour slows both alike
        torch_rates += images_per_s(torch_gen, batch, seconds / 5, 1)
        onnx_rates += images_per_s(onnx_gen, batch, seconds / 5, 1)
    a, b = statistics.median(torch_rates), statistics.median(onnx_rates)
    return {"name": name, "model_version": pipe.version, "family": pipe.family, "image_size": pipe.image_size,
            "batch": batch, "threads": threads, "pytorch_images_per_s": round(a, 1),
            "onnxruntime_images_per_s": round(b, 1), "onnx_over_pytorch": round(b / a, 3),
            "pytorch_rounds": [round(x, 1) for x in torch_rates], "onnx_rounds": [round(x, 1) for x in onnx_rates]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["dcgan-digits", "cdcgan-digits", "vae-digits", "seed-recipe"])
    p.add_argument("--checkpoint", nargs="*", default=[], help="benchmark these checkpoints instead")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0, help="per path per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both paths")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints = ({Path(c).name: c for c in args.checkpoint} if args.checkpoint
                       else {name: make_checkpoint(tmp / name, name) for name in args.configs})
        for name, ckpt in checkpoints.items():
            r = bench_one(name, ckpt, args.batch, args.seconds, args.threads, tmp)
            results.append(r)
            print(f"{r['name']:14s} {r['image_size']:3d}px batch {r['batch']}: pytorch {r['pytorch_images_per_s']:9.1f} "
                  f"img/s  onnxruntime {r['onnxruntime_images_per_s']:9.1f} img/s  ratio {r['onnx_over_pytorch']:.2f}")
    import onnxruntime

    report = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "batch": args.batch, "results": results,
              "min_ratio": min(r["onnx_over_pytorch"] for r in results)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"min onnx/pytorch ratio {report['min_ratio']:.2f}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
