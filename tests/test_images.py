"""PNG bytes and grids (aigc_ray.images): what they write is what libpng (torchvision's decoder)
reads back, pixel for pixel, with the metadata a user reads from the file; and the processes that
train, decode data and serve never import torchvision (3.5 s of CPU each)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision.io import decode_png as libpng_decode
from torchvision.io import encode_png as libpng_encode
from torchvision.utils import make_grid as torchvision_grid

from aigc_ray.images import decode_png, encode_png, make_grid


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trips_through_an_independent_codec(channels):
    image = torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = encode_png(image, {"Model": "v1", "Seed": "7"})
    assert torch.equal(libpng_decode(torch.frombuffer(bytearray(ours), dtype=torch.uint8)), image)
    assert Image.open(io.BytesIO(ours)).text == {"Model": "v1", "Seed": "7"}
    assert torch.equal(decode_png(libpng_encode(image).numpy().tobytes()), image)
    assert decode_png(ours, channels=3).shape == (3, 16, 16)


def test_a_corrupt_png_is_a_value_error_naming_it():
    good = encode_png(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a decodable PNG"):
        decode_png(good[:40] + b"\0" * 30)
    with pytest.raises(ValueError, match="not a decodable PNG"):
        decode_png(b"GIF89a" + b"\0" * 40)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(torch.zeros(1, 8, 8))


def test_grid_matches_torchvisions_layout():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(make_grid(images, nrow=4), torchvision_grid(images, nrow=4, padding=2))


def test_training_decoding_and_serving_modules_do_not_import_torchvision():
    code = ("import sys, aigc_ray.train.loop, aigc_ray.data.pipeline, aigc_ray.serving.app, aigc_ray.pipeline; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
