"""Per-sample augmentation of a batch on the training device (torch only).

torchvision's v2 transforms draw one set of random parameters per call, so on a batched
tensor every image would get the same rotation. Here each image gets its own affine
(rotation, zoom, translation) applied in one ``grid_sample`` call: (N, C, S, S) in,
(N, C, S, S) out, on whatever device the batch is on, so cached shards still see fresh
augmentation every epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(images: torch.Tensor, *, random_crop: bool, rotation_degrees: float, scale_range: float,
                  horizontal_flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """images: float (N, C, S, S) in [-1, 1]; the background (-1) fills uncovered pixels."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    if rotation_degrees > 0 or scale_range > 0 or random_crop:
        angle = uniform(-rotation_degrees, rotation_degrees) * (math.pi / 180)
        scale = uniform(1 - scale_range, 1 + scale_range)
        shift = 0.25 if random_crop else 0.0  # 1/8 of the side, in [-1, 1] grid units
        tx, ty = uniform(-shift, shift), uniform(-shift, shift)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (N, 2, 3)
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # shift to [0, 2] so zero padding means the background value -1
        images = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    if horizontal_flip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images
