import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_png

from aigc_ray.data.augment import augment_batch
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import PrepareError, prepare, read_manifest
from aigc_ray.data.sources import SourceError, open_source


def _png(array: np.ndarray) -> bytes:
    return encode_png(torch.from_numpy(array).permute(2, 0, 1).contiguous()).numpy().tobytes()


def _tree_hash(root) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_digits_source_is_offline_and_labelled():
    source = open_source("digits")
    records = list(source.records)
    assert len(records) == 1797
    assert records[0].payload.shape == (8, 8, 1) and records[0].payload.dtype == np.uint8
    assert {r.label for r in records} == set(range(10))


def test_shapes_is_deterministic_from_its_seed_and_labelled():
    a = [r.payload for r in open_source("shapes", num_shapes=8, image_size=16, seed=1).records]
    b = [r.payload for r in open_source("shapes", num_shapes=8, image_size=16, seed=1).records]
    c = [r.payload for r in open_source("shapes", num_shapes=8, image_size=16, seed=2).records]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    labels = {r.label for r in open_source("shapes", num_shapes=64, image_size=16).records}
    assert labels == {0, 1, 2, 3} and a[0].shape == (16, 16, 3)


def test_torchvision_source_without_data_says_what_to_do(tmp_path):
    with pytest.raises(SourceError, match="--download"):
        open_source("mnist", data_root=str(tmp_path))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(SourceError, match="digits, shapes"):
        open_source("imagenet")


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes; one corrupt file, one exact duplicate and one blank image among them."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)))
    (root / "cats" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (root / "dogs" / "copy.png").write_bytes((root / "dogs" / "0.png").read_bytes())
    (root / "dogs" / "blank.png").write_bytes(_png(np.full((12, 10, 3), 128, np.uint8)))
    (root / "notes.txt").write_text("not an image, ignored")
    return root


def test_prepare_cleans_and_counts_without_touching_the_source(messy_folder, tmp_path):
    before = _tree_hash(messy_folder)
    manifest = prepare(f"folder:{messy_folder}", tmp_path / "out", image_size=8, channels=1, quiet=True)
    assert manifest["dropped"] == {"undecodable": 1, "blank": 1, "duplicate": 1}
    assert manifest["skipped"] == {"not_in_a_class_folder": 1}  # notes.txt, beside the class folders
    assert sum(manifest["counts"].values()) == 10
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["num_classes"] == 2
    assert _tree_hash(messy_folder) == before  # the source is only read
    images, labels = load_split(str(tmp_path / "out"), "train")
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.uint8
    assert set(labels.tolist()) <= {0, 1}
    assert read_manifest(tmp_path / "out")["content_hash"] == manifest["content_hash"]


def test_prepare_is_deterministic(tmp_path):
    a = prepare("digits", tmp_path / "a", image_size=8, quiet=True)
    b = prepare("digits", tmp_path / "b", image_size=8, quiet=True)
    assert a["content_hash"] == b["content_hash"] and a["counts"] == b["counts"]
    assert sum(a["counts"].values()) == 1797 and a["counts"]["test"] > 0


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path):
    source = open_source("digits")
    good = source.records

    def dies_midway():
        for i, record in enumerate(good):
            if i == 700:
                raise KeyboardInterrupt
            yield record

    source.records = dies_midway()
    with pytest.raises(KeyboardInterrupt):
        prepare("digits", tmp_path / "out", image_size=8, quiet=True, source=source)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_prepare_refuses_to_clobber(tmp_path):
    prepare("digits", tmp_path / "out", image_size=8, quiet=True)
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare("digits", tmp_path / "out", image_size=8, quiet=True)


def test_parquet_source_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)) for _ in range(20)]
    pq.write_table(pa.table({"image": images, "label": [i % 2 for i in range(20)]}), tmp_path / "in.parquet")
    manifest = prepare(f"parquet:{tmp_path / 'in.parquet'}", tmp_path / "out", image_size=8, quiet=True)
    assert sum(manifest["counts"].values()) == 20 and manifest["num_classes"] == 2
    shard = pq.read_table(tmp_path / "out" / manifest["shards"]["train"][0])
    assert shard.column_names == ["image", "label"]
    json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_augmentation_is_per_sample_and_keeps_shape_and_range():
    x = torch.zeros(16, 1, 16, 16) - 1
    x[:, :, 4:12, 6:10] = 1.0  # the same bar in every image
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, random_crop=True, rotation_degrees=20, scale_range=0.1, horizontal_flip=True, generator=g)
    assert out.shape == x.shape and out.min() >= -1.0001 and out.max() <= 1.0001
    assert not torch.allclose(out[0], out[1])  # each image got its own transform
    same = augment_batch(x, random_crop=False, rotation_degrees=0, scale_range=0, horizontal_flip=False)
    assert torch.allclose(same, x, atol=1e-5)  # all off = identity


def test_blank_bytes_do_not_crash_prepare(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.png").write_bytes(b"")
    with pytest.raises(PrepareError, match="no usable images"):
        prepare(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=8, quiet=True)
    assert not (tmp_path / "out").exists()


def test_prepare_says_how_far_it_is_in_a_log(tmp_path, monkeypatch, capsys):
    """Off a terminal (here: captured stderr) the bar is off; a long prepare prints a line every PROGRESS_LINE_S
    seconds instead (0 here: one per image) with its count, rate and ETA."""
    import re

    from aigc_ray.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "PROGRESS_LINE_S", 0.0)
    prepare("digits", tmp_path / "out", image_size=8)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare digits: ")]
    assert lines and re.fullmatch(r"prepare digits: \d+/1797 images, \d+ img/s, eta \d+m\d\ds", lines[0]), lines[:2]
