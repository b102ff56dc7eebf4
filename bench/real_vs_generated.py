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


def colourfulness(images: torch.Tensor) -> float:
    """Hasler and Suesstrunk's colourfulness (2003), averaged over images: uint8 (N, 3, S, S) -> float
    (0 for grey images; about 15-30 for the shapes). The domain FID barely sees colour, so a grey
    sample grid can score well; this is the number that does not miss it."""
    r, g, b = images.float().unbind(1)  # (N, S, S) each
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = (rg.flatten(1).var(1) + yb.flatten(1).var(1)).sqrt()
    level = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2).sqrt()
    return float((spread + 0.3 * level).mean())


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
    if real.shape[1] == 3:
        print(f"colourfulness: real {colourfulness(real):.1f}, generated {colourfulness(generated):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
