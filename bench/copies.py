"""Does a checkpoint draw new images or replay its training set? A nearest-neighbour check.

    python bench/copies.py --checkpoint runs/<run>/checkpoint_<...> [--num-images 1000]

For each generated image (seeds 0..N-1) and each held-out test image, the pixel-space L2 distance
to its nearest training image. A generator that copies its training images sits far below the
held-out images (which are new draws from the same distribution): compare the medians, and count
generated images nearer to a training image than all but 1% of the held-out ones ("near copies";
held-out images score 1% by construction). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from aigc_ray.data.pipeline import load_split
from aigc_ray.models.checkpoint import read_meta
from aigc_ray.pipeline import GeneratorPipeline


def nearest_distances(images: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, S, S), (M, C, S, S) -> (N,) L2 distance (pixels in [0, 1]) to the nearest train image."""
    flat_train = train.flatten(1).float() / 255
    return torch.cat([torch.cdist(b.flatten(1).float() / 255, flat_train).min(1).values for b in images.split(256)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-images", type=int, default=1000)
    args = p.parse_args()
    prepared = read_meta(args.checkpoint)["dataset"]["prepared"]
    train, _ = load_split(prepared, "train")
    test, _ = load_split(prepared, "test")
    generated = GeneratorPipeline.from_checkpoint(args.checkpoint).generate(list(range(args.num_images)))
    held_out = nearest_distances(test[:args.num_images], train)
    drawn = nearest_distances(generated, train)
    threshold = torch.quantile(held_out, 0.01)
    print(json.dumps({
        "checkpoint": args.checkpoint, "generated": len(drawn), "held_out": len(held_out),
        "median_nn_distance": {"generated": round(float(drawn.median()), 4), "held_out": round(float(held_out.median()), 4)},
        "generated_over_held_out": round(float(drawn.median() / held_out.median()), 3),
        "near_copies": {"threshold": round(float(threshold), 4), "generated": round(float((drawn < threshold).float().mean()), 4),
                        "held_out": round(float((held_out < threshold).float().mean()), 4)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
