"""prepare on odd and hostile files: each is converted correctly or counted under a named
reason, the source is never left and never modified, and an old output survives until the new
one is complete."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from aigc_ray.cli import main
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import prepare, read_manifest


def _save(path, array, mode=None, fmt="PNG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path, fmt, **kw)


def _pattern(seed: int, shape=(8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _only_image(prepared):
    split = next(s for s, n in read_manifest(prepared)["counts"].items() if n)
    return load_split(str(prepared), split)[0][0]  # (C, 8, 8) uint8


def test_a_16_bit_png_is_scaled_not_fatal(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 500)  # 500 .. 63500
    img = Image.new("I;16", (8, 8))
    img.frombytes(grey16.astype("<u2").tobytes())
    (tmp_path / "src").mkdir()
    img.save(tmp_path / "src" / "deep.png")
    assert Image.open(tmp_path / "src" / "deep.png").mode.startswith("I")  # really 16-bit on disk
    prepare(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=8, channels=1, quiet=True)
    got = _only_image(tmp_path / "out")[0].numpy().astype(int)
    assert np.abs(got - (grey16 >> 8)).max() <= 1


def test_a_cmyk_jpeg_keeps_its_black_channel(tmp_path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:, 4:, 3] = 255  # right half: K only (black); left half: no ink (white)
    (tmp_path / "src").mkdir()
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "src" / "print.jpg", "JPEG", quality=100)
    prepare(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=8, channels=3, quiet=True)
    got = _only_image(tmp_path / "out").numpy().astype(int)  # (3, 8, 8)
    assert got[:, :, :3].min() > 230 and got[:, :, 5:].max() < 25


def test_symlinks_out_of_the_source_are_counted_never_followed(tmp_path):
    outside = tmp_path / "outside"
    _save(outside / "secret.png", _pattern(1))
    src = tmp_path / "src"
    _save(src / "cls" / "a.png", _pattern(2))
    _save(src / "cls" / "b.png", _pattern(3))
    os.symlink(outside, src / "escape")  # a class folder pointing out of the source
    os.symlink(outside / "secret.png", src / "cls" / "link.png")  # a file pointing out
    (src / "cls" / "notes.txt").write_text("not an image")
    manifest = prepare(f"folder:{src}", tmp_path / "out", image_size=8, channels=3, quiet=True)
    assert sum(manifest["counts"].values()) == 2 and manifest["class_names"] == ["cls"]
    assert manifest["skipped"] == {"outside_source": 2, "not_an_image": 1}


def test_per_file_caps_count_what_they_drop(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(3):
        _save(src / f"{i}.png", _pattern(i))
    _save(src / "huge.png", _pattern(9, (64, 64, 3)))  # 4096 pixels, ~12 KB
    big = io.BytesIO()
    Image.fromarray(_pattern(10, (200, 200, 3))).save(big, "PNG")
    (src / "heavy.png").write_bytes(big.getvalue())
    code = main(["prepare", "--dataset", f"folder:{src}", "--out", str(tmp_path / "out"), "--image-size", "8",
                 "--max-pixels", "1000", "--max-file-bytes", str(len(big.getvalue()) - 1)])
    assert code == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["dropped"]["too_many_pixels"] == 1 and manifest["skipped"] == {"file_too_large": 1}
    assert '"too_many_pixels": 1' in capsys.readouterr().out


def test_the_old_output_survives_a_failed_overwrite(tmp_path):
    prepare("digits", tmp_path / "out", image_size=8, quiet=True)
    before = read_manifest(tmp_path / "out")["content_hash"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no usable images"):
        prepare(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=8, quiet=True, overwrite=True)
    assert read_manifest(tmp_path / "out")["content_hash"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
