"""PNG bytes in and out, and sample grids, with Pillow and torch alone.

Why not torchvision.io and torchvision.utils: importing any part of torchvision runs its package
__init__, which imports torchvision.ops and with it torch._dynamo, about 3.5 s of CPU per process.
Every process that touches an image would pay it: each Train worker (its epoch grids), each
evaluation task, each Ray Data decode worker and each Serve replica. Pillow is already a dependency
(prepare reads source images with it) and imports in milliseconds. torchvision stays for prepare's
resizing (aigc_ray.data.prepare), a one-off step.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, PngImagePlugin

# model channels -> the Pillow mode its PNGs are decoded to
_MODES = {1: "L", 3: "RGB"}


def encode_png(image: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    """uint8 (C, H, W), C = 1 or 3 -> PNG bytes (8-bit grey or RGB), with optional tEXt chunks."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in _MODES:
        raise ValueError(f"expected a uint8 (C, H, W) image with C in (1, 3), got {image.dtype} {tuple(image.shape)}")
    pixels = image.cpu().numpy()
    pixels = pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))  # (H, W[, 3])
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)  # a tEXt chunk (latin-1), as the PNG spec's keywords are
    buffer = io.BytesIO()
    Image.fromarray(pixels, _MODES[image.shape[0]]).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_png(data: bytes, channels: int | None = None) -> torch.Tensor:
    """PNG bytes -> uint8 (C, H, W). channels 1 or 3 converts to grey or RGB; None keeps the file's
    own channels (grey 1, grey+alpha 2, RGB 3, RGBA 4). Raises ValueError for a corrupt stream."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if channels is not None:
                img = img.convert(_MODES[channels])
            elif img.mode not in ("L", "LA", "RGB", "RGBA"):
                # a palette PNG has an alpha channel only if it declares a transparent entry
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            pixels = np.asarray(img)
    except Exception as err:  # Pillow raises OSError, SyntaxError, struct.error ... for a corrupt stream
        raise ValueError(f"not a decodable PNG ({type(err).__name__}: {err})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (C, H, W), writable


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """(N, C, H, W) -> (C, rows*(H+p)+p, cols*(W+p)+p): the images in rows of `nrow`, `padding` apart."""
    count, channels, height, width = images.shape
    cols = max(1, min(nrow, count))
    rows = -(-count // cols)
    grid = images.new_full((channels, rows * (height + padding) + padding, cols * (width + padding) + padding),
                           pad_value)
    for index in range(count):
        top, left = (index // cols) * (height + padding) + padding, (index % cols) * (width + padding) + padding
        grid[:, top:top + height, left:left + width] = images[index]
    return grid
