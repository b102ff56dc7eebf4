"""Serving's input guards without Ray: PNG header checks (a real decompression bomb), tokens, exposure."""

import tracemalloc
import zlib

import pytest
import torch
from torchvision.io import encode_png

from aigc_ray.serving.auth import bearer_ok, is_loopback, resolve_token
from aigc_ray.serving.options import ServeOptions
from aigc_ray.serving.png import BadImage, check_png, png_header


def _real_bomb(side: int) -> bytes:
    """A genuine side x side 8-bit grayscale PNG of zeros (side**2 bytes decoded), built row by row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    z, row, parts = zlib.compressobj(9), bytes(side + 1), []  # filter byte 0 + a row of zeros
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_real_bomb_rejected_without_a_large_allocation():
    bomb = _real_bomb(8000)  # 64 MB decoded, ~64 KB on the wire
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match="8000x8000"):
            check_png(bomb, 8, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak  # bytes: the header was read, the IDAT never inflated


def test_header_checks_name_what_is_wrong():
    gray, rgb = (encode_png(torch.zeros(c, 8, 8, dtype=torch.uint8)).numpy().tobytes() for c in (1, 3))
    assert png_header(gray) == (8, 8, 8, 0) and png_header(rgb) == (8, 8, 8, 2)
    check_png(gray, 8, 1)
    check_png(rgb, 8, 3)
    for data, channels, match in [(rgb, 1, "grayscale PNG .1 channel., got RGB"), (gray, 3, "RGB PNG"),
                                  (b"GIF89a" + bytes(40), 1, "GIF"), (b"\xff\xd8\xff" + bytes(40), 1, "JPEG"),
                                  (gray[:20], 1, "truncated"), (gray[:29] + b"\0\0\0\0" + gray[33:], 1, "checksum")]:
        with pytest.raises(BadImage, match=match):
            check_png(data, 8, channels)
    with pytest.raises(BadImage, match="16x16"):
        check_png(encode_png(torch.zeros(1, 16, 16, dtype=torch.uint8)).numpy().tobytes(), 8, 1)


def test_bearer_tokens(tmp_path, monkeypatch):
    assert bearer_ok("", None)  # none configured: open
    assert bearer_ok("abc", "Bearer abc") and bearer_ok("abc", "bearer abc")
    assert not bearer_ok("abc", None) and not bearer_ok("abc", "Bearer abd") and not bearer_ok("abc", "abc")
    monkeypatch.setenv("AIGC_API_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert resolve_token(token_file=str(secret)) == "from-file"
    with pytest.raises(ValueError, match="api_token_file"):
        resolve_token(token_file=str(tmp_path / "missing"))
    secret.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_token(token_file=str(secret))


def test_serve_refuses_an_open_non_loopback_host(monkeypatch, capsys):
    from aigc_ray.cli import main

    monkeypatch.delenv("AIGC_API_TOKEN", raising=False)
    monkeypatch.delenv("AIGC_API_TOKEN_FILE", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    # refused before Ray starts (the checkpoint is never read)
    assert main(["serve", "--checkpoint", "nowhere/ckpt", "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("max_ongoing_requests", 0), ("max_queued_requests", -1),
                                         ("max_image_bytes", 0)])
def test_serve_options_reject_bad_limits(field, value):
    with pytest.raises(ValueError, match=field):
        ServeOptions(checkpoints=["x/y"], **{field: value})
