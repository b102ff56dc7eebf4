#!/usr/bin/env python3
"""Offline, embedded generation from an exported model: onnxruntime, numpy and Pillow only.

    aigc-ray export --checkpoint runs/best --format onnx --out model.onnx     # where torch lives
    python offline_generate.py model.onnx --seed 42 --num-images 16 --out samples/   # on the device

Writes one PNG per image, samples/seed-<seed>.png, labelled like the server's: tEXt chunks
`AI-Generated`, `Model-Version`, `Seed` (and `Label` for a class-conditional model). Image i
uses seed + i and the latent rule the server uses (`aigc-latents/1`, see aigc_ray/latents.py,
reproduced below because this file runs without the aigc_ray package), so the same seed gives
the same image (within 1/255: ONNX Runtime's arithmetic is not PyTorch's) as
`POST /v1/generate` and `aigc-ray generate` on the same model version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

LATENT_RULE = "aigc-latents/1"
AI_LABEL = "true: this image was made by a generative model"
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def seed_latents(seeds: list[int], latent_dim: int) -> np.ndarray:
    """(N, latent_dim) float32: SplitMix64 from each seed, Box-Muller in float64 (aigc-latents/1)."""
    pairs = (latent_dim + 1) // 2
    base = np.array([s % 2**64 for s in seeds], dtype=np.uint64)[:, None]
    raw = _mix(base + np.arange(1, 2 * pairs + 1, dtype=np.uint64)[None, :] * _GAMMA)
    u1 = ((raw[:, 0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (raw[:, 1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r, t = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    z = np.stack([r * np.cos(t), r * np.sin(t)], axis=2).reshape(len(seeds), 2 * pairs)
    return z[:, :latent_dim].astype(np.float32)


class OfflineGenerator:
    """An exported `generate` graph and what its metadata says about it."""

    def __init__(self, path: str, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("graph") != "generate":
            raise ValueError(f"{path}: graph {meta.get('graph')!r} is not an exported generate graph "
                             "(aigc-ray export --graph generate)")
        if meta.get("latent_rule") != LATENT_RULE:
            raise ValueError(f"{path}: latent rule {meta.get('latent_rule')!r}; this tool implements {LATENT_RULE}")
        self.version = meta["model_version"]
        self.latent_dim, self.num_classes = int(meta["latent_dim"]), int(meta["num_classes"])

    def check_labels(self, labels: list[int] | None, seeds: list[int]) -> np.ndarray | None:
        count = len(seeds)
        if not self.num_classes:
            if labels:
                raise ValueError(f"labels: model {self.version} is unconditional; omit --labels")
            return None
        if not labels:  # the rule's class for each seed: seed mod num_classes
            labels = [s % self.num_classes for s in seeds]
        labels = labels * count if len(labels) == 1 else labels
        if len(labels) != count:
            raise ValueError(f"labels: got {len(labels)} labels for {count} images")
        if any(not 0 <= y < self.num_classes for y in labels):
            raise ValueError(f"labels: {labels} out of range [0, {self.num_classes - 1}]")
        return np.asarray(labels, dtype=np.int64)

    def generate(self, seeds: list[int], labels: list[int] | None = None) -> np.ndarray:
        """uint8 (N, C, S, S) images for `seeds`."""
        feeds = {"z": seed_latents(seeds, self.latent_dim)}
        checked = self.check_labels(labels, seeds)
        if checked is not None:
            feeds["labels"] = checked
        return self.session.run(None, feeds)[0]


def save_png(image: np.ndarray, path: Path, version: str, seed: int, label: int | None) -> None:
    """uint8 (C, S, S) -> a PNG with the server's tEXt labels."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    text = {"Software": "aigc-ray", "Model-Version": version, "AI-Generated": AI_LABEL, "Seed": str(seed)}
    if label is not None:
        text["Label"] = str(label)
    for key, value in text.items():
        info.add_text(key, value)
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (S, S) grey or (S, S, 3) RGB
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, pnginfo=info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an ONNX file written by `aigc-ray export --format onnx`")
    p.add_argument("--seed", type=int, default=42, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--labels", help="comma-separated class labels for a conditional model (one = all)")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.seed < 0:
        p.error("--num-images must be >= 1 and --seed >= 0")
    if not Path(args.model).is_file():
        print(f"offline_generate: error: model: {args.model} is not a file", file=sys.stderr)
        return 2
    try:
        gen = OfflineGenerator(args.model, args.threads)
        seeds = list(range(args.seed, args.seed + args.num_images))
        labels = [int(v) for v in args.labels.split(",")] if args.labels else None
        images = gen.generate(seeds, labels)
    except (ValueError, OSError) as err:
        print(f"offline_generate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_image = None if not gen.num_classes else gen.check_labels(labels, seeds).tolist()
    for i, seed in enumerate(seeds):
        save_png(images[i], out / f"seed-{seed}.png", gen.version, seed, None if per_image is None else per_image[i])
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
