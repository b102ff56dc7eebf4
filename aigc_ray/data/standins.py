"""Real 28-32 px images made offline, written in torchvision's own file formats, so the ``mnist`` /
``fashion-mnist`` / ``cifar10`` path (``--data-root``) is exercised and measured on real pixels where
nothing can be downloaded. Not the datasets themselves, and never passed off as them:

- ``upscaled_digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) drawn as MNIST
  draws its digits, a 20x20 digit centred in a 28x28 frame, bicubic;
- ``photo_crops``: crops of scikit-learn's two bundled photographs (china.jpg, flower.jpg, 427x640) at
  five scales, each resized to 32x32; class = (photo, scale), 10 classes like CIFAR-10's.

``write_mnist_files`` / ``write_cifar_files`` write them where torchvision keeps MNIST
(``ROOT/MNIST/raw/*-ubyte``) and CIFAR-10 (``ROOT/cifar-10-batches-py/``); torchvision's own readers read
them (tests/test_real_data.py checks it). ``python bench/real32.py --make-data ROOT`` writes the full sets.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from aigc_ray.data.torchvision_files import IDX_FILES, IDX_UBYTE

CROP_SIDES = (32, 48, 72, 108, 162)  # source pixels per 32 px crop: 1x to ~5x, a factor 1.5 apart
MNIST_TEST_EVERY = 7  # MNIST holds out 10,000 of 70,000: one in 7
CIFAR_TEST_FRACTION = 1 / 6  # CIFAR-10 holds out 10,000 of 60,000


def upscaled_digits(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) and int64 (N,): the bundled digits as MNIST lays its digits out."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n = len(bunch.images) if limit is None else min(limit, len(bunch.images))
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        digit = Image.fromarray(np.round(bunch.images[i] * (255 / 16)).astype(np.uint8))
        out[i, 4:24, 4:24] = np.asarray(digit.resize((20, 20), Image.Resampling.BICUBIC))
    return out, bunch.target[:n].astype(np.int64)


def photo_crops(per_class: int, seed: int = 42, size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 (10 * per_class, size, size, 3), int64 labels and the class names: ``per_class`` crops at
    seeded random places of each bundled photo at each of CROP_SIDES, box-filtered down to ``size``."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    rng = np.random.default_rng(seed)
    images, labels, names = [], [], []
    for photo, name in zip(bunch.images, bunch.filenames):
        stem = Path(name).stem
        picture = Image.fromarray(photo)
        for side in CROP_SIDES:
            label = len(names)
            names.append(f"{stem}-{side}px")
            ys = rng.integers(0, photo.shape[0] - side + 1, per_class)
            xs = rng.integers(0, photo.shape[1] - side + 1, per_class)
            for y, x in zip(ys, xs):
                crop = picture.crop((int(x), int(y), int(x) + side, int(y) + side))
                images.append(np.asarray(crop.resize((size, size), Image.Resampling.BOX)))
                labels.append(label)
    order = rng.permutation(len(images))  # classes mixed, as a real dataset's files hold them
    return np.stack(images)[order], np.asarray(labels, np.int64)[order], names


def iid_test_mask(n: int, fraction: float, seed: int = 42) -> np.ndarray:
    """Which of n images are held out: a seeded draw of round(n * fraction), as an official split is."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[: max(1, round(n * fraction))]] = True
    return mask


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes (the format aigc_ray.data.torchvision_files.read_idx reads)."""
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mnist_files(root: Path, images: np.ndarray, labels: np.ndarray, test: np.ndarray,
                      dataset_class: str = "MNIST") -> Path:
    """ROOT/<dataset_class>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; ``test``: a mask of the
    images held out. Returns the raw folder."""
    raw = Path(root) / dataset_class / "raw"
    for split, mask in (("train", ~test), ("test", test)):
        images_name, labels_name = IDX_FILES[split]
        write_idx(raw / images_name, images[mask])
        write_idx(raw / labels_name, labels[mask].astype(np.uint8))
    return raw


def write_cifar_files(root: Path, images: np.ndarray, labels: np.ndarray, test: np.ndarray,
                      class_names: list[str]) -> Path:
    """ROOT/cifar-10-batches-py/: data_batch_1..5 (the train images in five parts), test_batch and
    batches.meta, pickled as the originals are (a dict of 'data' uint8 (N, 3072), R, G, B planes, and
    'labels'). Returns the folder."""
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, 3072): planes, as CIFAR stores them
    train_rows, train_labels = rows[~test], labels[~test]
    parts = np.array_split(np.arange(len(train_rows)), len(CIFAR10.train_list))
    for (name, _), part in zip(CIFAR10.train_list, parts):
        _pickle(folder / name, {"batch_label": name, "labels": train_labels[part].tolist(), "data": train_rows[part]})
    (name, _), = CIFAR10.test_list
    _pickle(folder / name, {"batch_label": name, "labels": labels[test].tolist(), "data": rows[test]})
    _pickle(folder / CIFAR10.meta["filename"], {CIFAR10.meta["key"]: list(class_names), "num_vis": 3072,
                                                  "num_cases_per_batch": len(parts[0])})
    return folder


def _pickle(path: Path, entry: dict) -> None:
    path.write_bytes(pickle.dumps(entry, protocol=2))  # the originals' protocol (Python 2's cPickle)
