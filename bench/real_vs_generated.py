"""Real | generated, side by side, for judging a checkpoint by eye before claiming a quality target.

    python bench/real_vs_generated.py --checkpoint runs/<run>/checkpoint_<...> --out bench/results/grids-X.png

Left: real training images from the checkpoint's own prepared dataset (its meta names it). Right: the
checkpoint's generator, seeds 0.. (a class-conditional model served without labels draws image i of class
seed mod num_classes, so with --per-row = num_classes each column is one class on both sides).
"""

from __future__ import annotations

import argparse
import io
import sys

import torch
from PIL import Image

from aigc_ray.data.pipeline import load_split
from aigc_ray.models.checkpoint import read_meta
from aigc_ray.pipeline import GeneratorPipeline, grid_png


def real_grid_images(prepared: str, per_row: int, rows: int, num_classes: int) -> torch.Tensor:
    """uint8 (rows * per_row, C, S, S): row r, column c = the r-th training image of class c mod num_classes."""
    images, labels = load_split(prepared, "train")
    if not num_classes:
        return images[:rows * per_row]
    picked = []
    for r in range(rows):
        for c in range(per_row):
            of_class = (labels == c % num_classes).nonzero()[:, 0]
            picked.append(images[of_class[(r + c // num_classes * rows) % len(of_class)]])
    return torch.stack(picked)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--per-row", type=int, help="images per row (default: the number of classes, else 8)")
    p.add_argument("--scale", type=int, default=4, help="pixel magnification (nearest neighbour)")
    args = p.parse_args()
    meta = read_meta(args.checkpoint)
    num_classes = meta["dataset"].get("num_classes") or 0
    per_row = args.per_row or num_classes or 8
    real = real_grid_images(meta["dataset"]["prepared"], per_row, args.rows, num_classes)
    generated = GeneratorPipeline.from_checkpoint(args.checkpoint).generate(list(range(args.rows * per_row)))
    left, right = (Image.open(io.BytesIO(grid_png(x, nrow=per_row))) for x in (real, generated))
    both = Image.new(left.mode, (left.width * 2 + 8, left.height), 255 if left.mode == "L" else (255, 255, 255))
    both.paste(left, (0, 0))
    both.paste(right, (left.width + 8, 0))
    both.resize((both.width * args.scale, both.height * args.scale), Image.NEAREST).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
