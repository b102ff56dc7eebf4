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
    skip: str = ""
    """Why this entry is passed over without being read (counted under the name in the
    manifest's ``skipped``): not_an_image, outside_source, file_too_large."""


@dataclass
class Source:
    name: str
    class_names: list[str]
    records: Iterator[Record] = field(repr=False)
    size_hint: int | None = None


def open_source(dataset: str, *, data_root: str = "~/.cache/aigc-ray", download: bool = False,
                image_size: int = 32, num_shapes: int = 4096, seed: int = 42,
                max_file_bytes: int = 64 * 2**20) -> Source:
    """Resolve a dataset name (see DataConfig.dataset) to a Source."""
    root = Path(os.path.expanduser(data_root))
    if dataset == "digits":
        return _digits()
    if dataset == "shapes":
        return Source("shapes", list(SHAPE_CLASSES), _shapes(num_shapes, image_size, seed), num_shapes)
    if dataset in TORCHVISION:
        return _torchvision(dataset, root, download)
    if dataset.startswith("folder:"):
        return _folder(Path(dataset[len("folder:"):]).expanduser(), max_file_bytes)
    if dataset.startswith("parquet:"):
        return _parquet(dataset[len("parquet:"):], max_file_bytes)
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


def _folder(path: Path, max_file_bytes: int) -> Source:
    """Sub-folders are classes; files directly in the root are unlabelled. Every path is
    resolved and must stay inside the source: a symlink out of it (a file, or a class folder
    such as ``ln -s / src/cls``) is never followed, only counted."""
    if not path.is_dir():
        raise SourceError(f"folder:{path} is not a directory")
    root = path.resolve()

    def inside(p: Path) -> bool:
        return p.resolve().is_relative_to(root)

    entries = sorted(path.iterdir())
    subdirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
    escaped = [p for p in entries if p.is_dir() and p.is_symlink()]  # class folders that link elsewhere
    classes = [p.name for p in subdirs]
    if subdirs:
        files = [(f, i) for i, d in enumerate(subdirs) for f in _walk(d)]
    else:
        files = [(f, -1) for f in _walk(path)]

    loose = [p for p in entries if not p.is_dir()] if subdirs else []  # beside the class folders

    def records() -> Iterator[Record]:
        for d in escaped:
            yield Record(str(d.relative_to(path)), b"", -1, skip="outside_source")
        for f in loose:
            yield Record(f.name, b"", -1, skip="not_in_a_class_folder")
        for f, label in files:
            key = str(f.relative_to(path))
            if f.is_dir():  # a symlinked folder: never entered
                yield Record(key, b"", label, skip="symlinked_folder" if inside(f) else "outside_source")
            elif f.suffix.lower() not in IMAGE_SUFFIXES:
                yield Record(key, b"", label, skip="not_an_image")
            elif not inside(f) or not f.is_file():
                yield Record(key, b"", label, skip="outside_source")
            elif f.stat().st_size > max_file_bytes:
                yield Record(key, b"", label, skip="file_too_large")
            else:
                yield Record(key, f.read_bytes(), label)

    if not any(f.suffix.lower() in IMAGE_SUFFIXES for f, _ in files):
        raise SourceError(f"folder:{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Source(f"folder:{path}", classes, records(), len(files) + len(escaped) + len(loose))


def _walk(directory: Path) -> list[Path]:
    """Every file under ``directory`` (sorted), symlinked folders not followed; symlinked files
    are listed (and checked against the source root by the caller)."""
    found = []
    for parent, dirs, names in os.walk(directory, followlinks=False):
        found += [Path(parent, n) for n in names]
        found += [Path(parent, d) for d in dirs if Path(parent, d).is_symlink()]  # counted, never entered
    return sorted(found)


def _parquet(uri: str, max_file_bytes: int) -> Source:
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
    records = (Record(f"parquet/{i}", img or b"", lab, skip="file_too_large" if img and len(img) > max_file_bytes else "")
               for i, (img, lab) in enumerate(zip(images, labels)))
    return Source(f"parquet:{uri}", [str(c) for c in range(n_classes)], records, len(images))

