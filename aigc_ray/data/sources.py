"""Image sources. Each yields ``Record(key, payload, label)`` where payload is either an
already-decoded uint8 array (H, W, C) or the encoded bytes of a file, which ``prepare``
decodes (and counts as undecodable when that fails). Labels are ints, or -1 when unknown.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aigc_ray.config import MAX_NUM_CLASSES as MAX_CLASSES  # labels beyond it are refused

BUILTIN = ("digits", "shapes")
TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")


class SourceError(ValueError):
    """The dataset name or location is not usable; the message says what to do."""


@dataclass
class Record:
    key: str
    payload: np.ndarray | bytes
    label: int = -1


@dataclass
class Source:
    name: str
    class_names: list[str]
    records: Iterator[Record] = field(repr=False)
    size_hint: int | None = None


def open_source(dataset: str, *, data_root: str = "~/.cache/aigc-ray", download: bool = False,
                image_size: int = 32, num_shapes: int = 4096, seed: int = 42) -> Source:
    """Resolve a dataset name (see DataConfig.dataset) to a Source."""
    root = Path(os.path.expanduser(data_root))
    if dataset == "digits":
        return _digits()
    if dataset == "shapes":
        return Source("shapes", list(SHAPE_CLASSES), _shapes(num_shapes, image_size, seed), num_shapes)
    if dataset in TORCHVISION:
        return _torchvision(dataset, root, download)
    if dataset.startswith("folder:"):
        return _folder(Path(dataset[len("folder:"):]).expanduser())
    if dataset.startswith("parquet:"):
        return _parquet(dataset[len("parquet:"):])
    raise SourceError(f"unknown dataset {dataset!r}; use digits, shapes, {', '.join(TORCHVISION)}, "
                      "folder:PATH or parquet:PATH")


def _digits() -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # bundled with scikit-learn: 1,797 images, 8x8, values 0..16
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    records = (Record(f"digits/{i}", images[i], int(bunch.target[i])) for i in range(len(images)))
    return Source("digits", [str(d) for d in range(10)], records, len(images))


def _shapes(count: int, size: int, seed: int) -> Iterator[Record]:
    """Coloured shapes on a dark background, drawn at 4x and averaged down (anti-aliased)."""
    rng = np.random.default_rng(seed)
    hi = size * 4
    yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float32) / hi  # pixel centres in [0, 1)
    for i in range(count):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        r = rng.uniform(0.15, 0.3)
        angle = rng.uniform(0, np.pi)
        # rotate coordinates about the centre so squares, triangles and crosses turn
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        if label == 0:
            mask = u**2 + v**2 <= r**2
        elif label == 1:
            mask = (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
        elif label == 2:
            mask = (v >= -r * 0.6) & (v <= r * 0.8 - 1.6 * np.abs(u))
        else:
            mask = ((np.abs(u) <= r * 0.25) | (np.abs(v) <= r * 0.25)) & (np.abs(u) <= r) & (np.abs(v) <= r)
        colour = rng.uniform(0.4, 1.0, size=3)
        background = rng.uniform(0.0, 0.15, size=3)
        canvas = np.where(mask[..., None], colour, background)  # (hi, hi, 3)
        small = canvas.reshape(size, 4, size, 4, 3).mean(axis=(1, 3))
        yield Record(f"shapes/{seed}/{i}", np.round(small * 255).astype(np.uint8), label)


def _torchvision(dataset: str, root: Path, download: bool) -> Source:
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION[dataset])
    try:
        ds = cls(str(root / dataset), train=True, download=download)
    except RuntimeError as err:
        raise SourceError(f"{dataset} is not in {root / dataset} ({err}). Put it there, or pass --download "
                          "on a machine that is online; digits and shapes work offline.") from None

    def records() -> Iterator[Record]:
        for i in range(len(ds)):
            image, label = ds[i]
            array = np.asarray(image, dtype=np.uint8)
            yield Record(f"{dataset}/{i}", array[..., None] if array.ndim == 2 else array, int(label))

    return Source(dataset, [str(c) for c in ds.classes], records(), len(ds))


def _folder(path: Path) -> Source:
    if not path.is_dir():
        raise SourceError(f"folder:{path} is not a directory")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:  # sub-folders are classes; files directly in the root are unlabelled
        classes = [p.name for p in subdirs]
        files = [(f, i) for i, d in enumerate(subdirs) for f in sorted(d.rglob("*")) if f.is_file()]
    else:
        classes, files = [], [(f, -1) for f in sorted(path.rglob("*")) if f.is_file()]
    files = [(f, label) for f, label in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SourceError(f"folder:{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    records = (Record(str(f.relative_to(path)), f.read_bytes(), label) for f, label in files)
    return Source(f"folder:{path}", classes, records, len(files))


def _parquet(uri: str) -> Source:
    """Parquet with an ``image`` column of encoded bytes and an optional integer ``label``
    column. Every file's schema is checked before any cell is converted (see data/schema.py)."""
    import pyarrow.dataset as pads

    from aigc_ray.data.schema import check_image_schema

    try:
        ds = pads.dataset(uri, format="parquet")
        schemas = [(f.path, f.physical_schema) for f in ds.get_fragments()]  # footers only
    except (OSError, ValueError) as err:
        raise SourceError(f"parquet:{uri} can't be read: {err}") from None
    if not schemas:
        raise SourceError(f"parquet:{uri} holds no Parquet files")
    labelled = [check_image_schema(schema, f"parquet:{path}") for path, schema in schemas]
    columns = ["image", "label"] if all(labelled) else ["image"]
    try:
        table = ds.to_table(columns=columns)
    except (OSError, ValueError) as err:
        raise SourceError(f"parquet:{uri} can't be read: {err}") from None
    images = table.column("image").to_pylist()  # bytes: the type was checked above
    labels = table.column("label").to_pylist() if "label" in columns else [-1] * len(images)
    labels = [-1 if lab is None else lab for lab in labels]
    bad = [lab for lab in labels if not -1 <= lab < MAX_CLASSES]
    if bad:
        raise SourceError(f"parquet:{uri}: label {bad[0]} out of range; labels are 0..{MAX_CLASSES - 1}, "
                          "or -1 for unlabelled")
    n_classes = max(labels, default=-1) + 1
    records = (Record(f"parquet/{i}", img, lab) for i, (img, lab) in enumerate(zip(images, labels)))
    return Source(f"parquet:{uri}", [str(c) for c in range(n_classes)], records, len(images))

