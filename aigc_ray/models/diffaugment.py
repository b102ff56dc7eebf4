"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable augmentation T is applied to every image D sees, real and fake,
in D's step and in G's step: D learns on T(x) and T(G(z)), G is trained through T, so G is pushed
towards the data, not towards augmented data (augmenting the real images alone teaches G to draw
the augmentations; see DataConfig). On 1,437 digits D otherwise memorises the training set.

Ops (each per image, on the batch's device):
  - color:       brightness +U(-0.5, 0.5); saturation x U(0, 2) around the per-pixel channel mean
                 (a no-op for grey images); contrast x U(0.5, 1.5) around the image mean;
  - translation: an integer shift of up to 1/8 of the side in x and y; uncovered pixels become -1
                 (black, the background of the built-in datasets);
  - cutout:      one square of half the side, at a random place, set to 0 (mid grey).

Random parameters come from torch's default generator on the batch's device (torch.rand(...,
device=x.device)), with no host sync and no data-dependent shapes, so a training step that calls
this can be captured as a CUDA graph: the CUDA generator's Philox offset advances on every
replay, giving fresh augmentations each step.

Torch only (no Ray). x: float (N, C, S, S) in [-1, 1] -> same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aigc_ray.config import ConfigError

POLICY_OPS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """"translation,cutout,color" -> ("translation", "cutout", "color"); "" -> () (off).
    Raises ValueError naming an unknown op."""
    ops = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [op for op in ops if op not in POLICY_OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; use a comma-separated subset of {list(POLICY_OPS)}")
    return ops


def check_policy(policy, field: str = "model.options.diffaugment") -> None:
    """A config's policy string: ConfigError naming the field when it isn't one."""
    if not isinstance(policy, str):
        raise ConfigError(f"{field} must be a string such as 'translation,cutout,color' ('' = off), got {policy!r}")
    try:
        parse_policy(policy)
    except ValueError as err:
        raise ConfigError(f"{field}={policy!r}: {err}") from None


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | str) -> torch.Tensor:
    """Apply the policy's ops in the order written. Gradients flow to x."""
    ops = parse_policy(policy) if isinstance(policy, str) else policy
    for op in ops:
        x = _OPS[op](x)
    return x


def _rand(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, dtype=x.dtype, device=x.device)


def color(x: torch.Tensor) -> torch.Tensor:
    x = x + (_rand(x, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)  # (N, 1, S, S)
    x = (x - mean) * (_rand(x, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - mean) * (_rand(x, 1, 1, 1) + 0.5) + mean  # contrast


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    # integer shifts in [-sh, sh] (N, 1, 1), drawn as floats on the device (no host sync)
    dy = (torch.rand(n, 1, 1, device=x.device) * (2 * sh + 1)).floor().long() - sh
    dx = (torch.rand(n, 1, 1, device=x.device) * (2 * sw + 1)).floor().long() - sw
    rows = torch.arange(h, device=x.device)[None, :, None] + dy  # (N, H, 1): source row per output row
    cols = torch.arange(w, device=x.device)[None, None, :] + dx  # (N, 1, W)
    # pad by one pixel of background (-1) and point every out-of-range index at that pad
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (N, C, H+2, W+2)
    rows = (rows + 1).clamp(0, h + 1).expand(n, h, w)
    cols = (cols + 1).clamp(0, w + 1).expand(n, h, w)
    flat = (rows * (w + 2) + cols).reshape(n, 1, h * w).expand(-1, x.shape[1], -1)  # (N, C, H*W)
    return padded.flatten(2).gather(2, flat).view_as(x)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # the square's top-left corner, so that its centre is uniform over the image (as the paper's)
    top = (torch.rand(n, 1, 1, device=x.device) * (h + (1 - ch % 2))).floor() - ch // 2
    left = (torch.rand(n, 1, 1, device=x.device) * (w + (1 - cw % 2))).floor() - cw // 2
    r = torch.arange(h, device=x.device, dtype=top.dtype)[None, :, None]
    c = torch.arange(w, device=x.device, dtype=top.dtype)[None, None, :]
    inside = (r >= top) & (r < top + ch) & (c >= left) & (c < left + cw)  # (N, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": color, "translation": translation, "cutout": cutout}
