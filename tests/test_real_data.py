"""28-32 px real data from files the user already has: torchvision's MNIST / Fashion-MNIST / CIFAR-10 files
under --data-root (both official splits, the official test set kept as the test split), a folder with its
own train/ and test/, a Parquet file with a split column. Built from tiny real images made offline
(aigc_ray/data/standins.py: the bundled digits upscaled to MNIST's 28 px, crops of the bundled photos)."""

import gzip
import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aigc_ray.cli import main
from aigc_ray.data import standins
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import prepare
from aigc_ray.data.sources import SourceError, open_source


@pytest.fixture(scope="module")
def digits28():
    images, labels = standins.upscaled_digits(limit=70)
    return images, labels, np.arange(len(images)) % standins.MNIST_TEST_EVERY == 0  # 10 of 70 held out


@pytest.fixture(scope="module")
def crops32():
    images, labels, names = standins.photo_crops(per_class=3)
    return images, labels, standins.iid_test_mask(len(images), 0.2), names  # 30 crops, 6 held out


@pytest.mark.parametrize("dataset, layout, gzipped", [
    ("mnist", "{root}/MNIST/raw", False),  # torchvision's own root, given as --data-root
    ("fashion-mnist", "{root}/fashion-mnist/FashionMNIST/raw", True),  # where --download puts it; .gz only
])
def test_mnist_files_keep_their_official_test_split(tmp_path, digits28, dataset, layout, gzipped):
    import torchvision.datasets

    images, labels, test = digits28
    dataset_class = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset]
    raw = standins.write_mnist_files(tmp_path / "written", images, labels, test, dataset_class)
    official = torchvision.datasets.MNIST(str(tmp_path / "written"), train=False) if dataset == "mnist" else None
    target = tmp_path / "root" / layout.format(root="")[1:]
    target.mkdir(parents=True)
    for f in raw.iterdir():
        data = f.read_bytes()
        (target / (f.name + ".gz" if gzipped else f.name)).write_bytes(gzip.compress(data) if gzipped else data)
    manifest = prepare(dataset, tmp_path / "out", image_size=32, channels=1, data_root=str(tmp_path / "root"), quiet=True)
    assert manifest["counts"] == {"train": 60, "test": 10} and manifest["split"] == "source"
    assert manifest["class_names"] == getattr(torchvision.datasets, dataset_class).classes
    held_out, held_labels = load_split(str(tmp_path / "out"), "test")
    assert held_out.shape == (10, 1, 32, 32) and held_labels.tolist() == labels[test].tolist()
    if official is not None:  # torchvision itself reads the files written as its own
        assert official.targets.tolist() == labels[test].tolist() and np.array_equal(official.data.numpy(), images[test])


def test_cifar10_batches_are_read_as_torchvision_reads_them_without_its_md5s(tmp_path, crops32, monkeypatch):
    import torchvision.datasets.cifar as cifar

    images, labels, test, names = crops32
    standins.write_cifar_files(tmp_path, images, labels, test, names)
    source = open_source("cifar10", data_root=str(tmp_path))
    records = list(source.records)
    train = np.stack([r.payload for r in records if r.split == "train"])
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # these are not the original files
    official = cifar.CIFAR10(str(tmp_path), train=True)
    assert np.array_equal(train, official.data) and [r.label for r in records if r.split == "train"] == official.targets
    assert source.class_names == official.classes == names
    manifest = prepare("cifar10", tmp_path / "out", image_size=32, channels=3, data_root=str(tmp_path), quiet=True)
    assert manifest["counts"] == {"train": 24, "test": 6} and manifest["num_classes"] == 10


def test_a_data_root_without_the_files_names_what_goes_where(tmp_path, capsys):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")  # a copy half made
    assert main(["prepare", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"expected train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte in {tmp_path}/MNIST/raw" in err
    assert "--data-root" in err and "Traceback" not in err
    with pytest.raises(SourceError, match=r"data_batch_1, .*test_batch, batches.meta in .*cifar-10-batches-py"):
        open_source("cifar10", data_root=str(tmp_path))


class _Runs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_damaged_or_hostile_files_are_one_clear_error_and_run_nothing(tmp_path, digits28, crops32, capsys):
    images, labels, test = digits28
    raw = standins.write_mnist_files(tmp_path / "m", images, labels, test)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-100])
    assert main(["prepare", "--dataset", "mnist", "--data-root", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte: the header says 10x28x28 = 7840 bytes, the file holds 7740" in err
    assert "Traceback" not in err

    c_images, c_labels, c_test, names = crops32
    folder = standins.write_cifar_files(tmp_path / "c", c_images, c_labels, c_test, names)
    marker = tmp_path / "ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _Runs(marker), "labels": []}, protocol=2))
    (folder / "data_batch_4").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00data")  # cut off
    assert main(["prepare", "--dataset", "cifar10", "--data-root", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_3 is not a CIFAR-10 python batch" in err and "names io.open" in err and "Traceback" not in err
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes((folder / "data_batch_2").read_bytes())
    with pytest.raises(SourceError, match="data_batch_4 is not a CIFAR-10 python batch"):
        open_source("cifar10", data_root=str(tmp_path / "c"))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _folder(root, images, labels, names):
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        (root / names[label] / f"{i}.png").write_bytes(_png(image))


def test_a_folder_with_train_and_test_keeps_its_split(tmp_path, crops32):
    images, labels, test, names = crops32
    _folder(tmp_path / "src" / "train", images[~test], labels[~test], names)
    _folder(tmp_path / "src" / "test", images[test], labels[test], names)
    manifest = prepare(f"folder:{tmp_path / 'src'}", tmp_path / "out", image_size=32, channels=3, quiet=True)
    assert manifest["counts"] == {"train": 24, "test": 6} and manifest["split"] == "source"
    assert manifest["class_names"] == sorted(names)  # one class list for both splits, by folder name
    _, held_labels = load_split(str(tmp_path / "out"), "test")
    assert sorted(manifest["class_names"][i] for i in held_labels.tolist()) == sorted(names[i] for i in labels[test])


def test_a_folder_with_train_but_an_empty_test_says_so(tmp_path, crops32):
    images, labels, test, names = crops32
    _folder(tmp_path / "src" / "train", images, labels, names)
    with pytest.raises(SourceError, match="train/ but no test/"):
        open_source(f"folder:{tmp_path / 'src'}")
    (tmp_path / "src" / "test" / names[0]).mkdir(parents=True)
    with pytest.raises(SourceError, match="test/ holds no image files; put the test images there"):
        open_source(f"folder:{tmp_path / 'src'}")


def test_a_parquet_split_column_is_kept_and_checked(tmp_path, crops32):
    images, labels, test, _ = crops32
    rows = {"image": [_png(a) for a in images], "label": labels.tolist()}
    pq.write_table(pa.table(rows | {"split": ["test" if t else "train" for t in test]}), tmp_path / "split.parquet")
    pq.write_table(pa.table(rows), tmp_path / "plain.parquet")
    own = prepare(f"parquet:{tmp_path / 'split.parquet'}", tmp_path / "a", image_size=32, channels=3, quiet=True)
    hashed = prepare(f"parquet:{tmp_path / 'plain.parquet'}", tmp_path / "b", image_size=32, channels=3, quiet=True)
    assert own["counts"] == {"train": 24, "test": 6} and own["split"] == "source" and hashed["split"] == "hash"
    assert own["content_hash"] != hashed["content_hash"]  # the same images split otherwise: another dataset
    pq.write_table(pa.table(rows | {"split": ["val"] * len(images)}), tmp_path / "val.parquet")
    with pytest.raises(SourceError, match="split 'val' is not one of train, test"):
        open_source(f"parquet:{tmp_path / 'val.parquet'}")
    pq.write_table(pa.table(rows | {"split": [1] * len(images)}), tmp_path / "int.parquet")
    with pytest.raises(ValueError, match="column 'split' has type int64; expected strings"):
        open_source(f"parquet:{tmp_path / 'int.parquet'}")


@pytest.mark.parametrize("name, channels", [("vae-mnist", 1), ("vae-fashion-mnist", 1), ("vae-cifar10", 3)])
def test_the_real_data_configs_train_32_px_from_the_data_root(name, channels, tmp_path, capsys):
    assert main(["train", "--config", name, "--data-root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "image_size: 32" in out and f"channels: {channels}" in out and f"data_root: {tmp_path}" in out
