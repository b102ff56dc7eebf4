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
SPLITS = ("train", "test")  # what a source may name as an image's split (Record.split)


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
    split: str = ""
    """The split the source itself puts this image in (one of SPLITS: a torchvision dataset's official
    test set, a folder's test/, a Parquet ``split`` column); "" = prepare's hash split decides."""


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
    """Both official splits, the official test set kept as the test split (the floor is the dataset's own
    test set), read from torchvision's files (data/torchvision_files.py says why not through torchvision)."""
    from aigc_ray.data import torchvision_files as tvf

    dataset_class = TORCHVISION[dataset]
    try:
        files = tvf.read_official(dataset, dataset_class, root)
        if files is None and download:  # torchvision fetches (and md5-checks) them into root/<dataset>
            import torchvision

            try:
                getattr(torchvision.datasets, dataset_class)(str(root / dataset), train=True, download=True)
            except (RuntimeError, OSError) as err:
                raise SourceError(f"{dataset}: the download into {root / dataset} failed ({err})") from None
            files = tvf.read_official(dataset, dataset_class, root)
    except tvf.FileFormatError as err:
        raise SourceError(f"{dataset}: {err}; replace the file with the dataset's original") from None
    if files is None:
        folders = (tvf.cifar_folders(root, dataset) if dataset_class == "CIFAR10"
                   else tvf.idx_folders(root, dataset, dataset_class))
        nearest = min(folders, key=lambda f: len(tvf.missing_files(dataset_class, f)))  # a copy half made
        missing = tvf.missing_files(dataset_class, nearest)
        others = " or ".join(str(f) for f in folders if f != nearest)
        raise SourceError(f"{dataset} is not under --data-root {root}: expected {', '.join(missing)} in {nearest} "
                          f"(or the whole set in {others}). Copy torchvision's files there, or pass --download on a "
                          "machine that is online; digits and shapes work offline.")

    def records() -> Iterator[Record]:
        for split in SPLITS:
            part = getattr(files, split)
            for i in range(len(part.labels)):
                yield Record(f"{dataset}/{split}/{i}", part.images[i], int(part.labels[i]), split=split)

    return Source(dataset, files.class_names, records(), len(files.train.labels) + len(files.test.labels))


def _folder(path: Path, max_file_bytes: int) -> Source:
    """Sub-folders are classes; files directly in the root are unlabelled. A root holding only
    ``train/`` and ``test/`` has its own split: each is laid out so (class folders, or loose files),
    and a class is the same class in both (by folder name). Every path is resolved and must stay
    inside the source: a symlink out of it (a file, or a class folder such as ``ln -s / src/cls``)
    is never followed, only counted."""
    if not path.is_dir():
        raise SourceError(f"folder:{path} is not a directory")
    root = path.resolve()
    top = {p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink()}
    if not (top and top <= set(SPLITS)):
        classes = _class_folders(path)
        return Source(f"folder:{path}", classes, *_folder_records(path, root, classes, "", max_file_bytes))
    for split in SPLITS:
        if split not in top:
            raise SourceError(f"folder:{path} has {'/ and '.join(sorted(top))}/ but no {split}/: a folder with its own "
                              f"split needs both {'/ and '.join(SPLITS)}/ (the same class folders in each); to have "
                              "aigc-ray hold out a test split itself, put the class folders directly in the root")
    for split in SPLITS:  # before the layout checks below: an empty test/ is the likelier slip
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in _walk(path / split)):
            raise SourceError(f"folder:{path}: {split}/ holds no image files; put the {split} images there "
                              "(class folders as in the other split), or remove train/ and test/ and put the class "
                              "folders in the root to have aigc-ray hold out a test split itself")
    per_split = {split: _class_folders(path / split) for split in SPLITS}
    if len({bool(c) for c in per_split.values()}) > 1:
        raise SourceError(f"folder:{path}: train/ and test/ must both hold class folders, or both only images")
    classes = sorted(set().union(*per_split.values()))
    parts = [_folder_records(path / split, root, classes, split, max_file_bytes) for split in SPLITS]

    def records() -> Iterator[Record]:
        for part, _ in parts:
            yield from part

    return Source(f"folder:{path}", classes, records(), sum(n for _, n in parts))


def _class_folders(path: Path) -> list[str]:
    return [p.name for p in sorted(path.iterdir()) if p.is_dir() and not p.is_symlink()]


def _folder_records(path: Path, root: Path, classes: list[str], split: str,
                    max_file_bytes: int) -> tuple[Iterator[Record], int]:
    """The records of one folder laid out as classes (``classes``, labels by name) or loose images, and
    how many there are; ``root``: the source's resolved root, which no path may leave."""

    def inside(p: Path) -> bool:
        return p.resolve().is_relative_to(root)

    entries = sorted(path.iterdir())
    subdirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
    escaped = [p for p in entries if p.is_dir() and p.is_symlink()]  # class folders that link elsewhere
    if subdirs:
        files = [(f, classes.index(d.name)) for d in subdirs for f in _walk(d)]
    else:
        files = [(f, -1) for f in _walk(path)]
    loose = [p for p in entries if not p.is_dir()] if subdirs else []  # beside the class folders
    top = path if not split else path.parent  # keys stay relative to the source's root

    def records() -> Iterator[Record]:
        for d in escaped:
            yield Record(str(d.relative_to(top)), b"", -1, skip="outside_source")
        for f in loose:
            yield Record(str(f.relative_to(top)), b"", -1, skip="not_in_a_class_folder")
        for f, label in files:
            key = str(f.relative_to(top))
            if f.is_dir():  # a symlinked folder: never entered
                yield Record(key, b"", label, skip="symlinked_folder" if inside(f) else "outside_source")
            elif f.suffix.lower() not in IMAGE_SUFFIXES:
                yield Record(key, b"", label, skip="not_an_image")
            elif not inside(f) or not f.is_file():
                yield Record(key, b"", label, skip="outside_source")
            elif f.stat().st_size > max_file_bytes:
                yield Record(key, b"", label, skip="file_too_large")
            else:
                yield Record(key, f.read_bytes(), label, split=split)

    if not any(f.suffix.lower() in IMAGE_SUFFIXES for f, _ in files):
        raise SourceError(f"folder:{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
                          + (f"; its {split}/ split needs some" if split else ""))
    return records(), len(files) + len(escaped) + len(loose)


def _walk(directory: Path) -> list[Path]:
    """Every file under ``directory`` (sorted), symlinked folders not followed; symlinked files
    are listed (and checked against the source root by the caller)."""
    found = []
    for parent, dirs, names in os.walk(directory, followlinks=False):
        found += [Path(parent, n) for n in names]
        found += [Path(parent, d) for d in dirs if Path(parent, d).is_symlink()]  # counted, never entered
    return sorted(found)


def _parquet(uri: str, max_file_bytes: int) -> Source:
    """Parquet with an ``image`` column of encoded bytes, an optional integer ``label`` column and an
    optional ``split`` column ("train" / "test": the data's own split, kept by prepare). Every file's
    schema is checked before any cell is converted (see data/schema.py)."""
    import pyarrow.dataset as pads

    from aigc_ray.data.schema import check_image_schema, check_split_column

    try:
        ds = pads.dataset(uri, format="parquet")
        schemas = [(f.path, f.physical_schema) for f in ds.get_fragments()]  # footers only
    except (OSError, ValueError) as err:
        raise SourceError(f"parquet:{uri} can't be read: {err}") from None
    if not schemas:
        raise SourceError(f"parquet:{uri} holds no Parquet files")
    labelled = [check_image_schema(schema, f"parquet:{path}") for path, schema in schemas]
    has_split = [check_split_column(schema, f"parquet:{path}") for path, schema in schemas]
    if any(has_split) and not all(has_split):
        raise SourceError(f"parquet:{uri}: some files have a 'split' column and some don't; give every file one, "
                          "or none (then aigc-ray holds out a test split itself)")
    columns = (["image", "label"] if all(labelled) else ["image"]) + (["split"] if all(has_split) else [])
    try:
        table = ds.to_table(columns=columns)
    except (OSError, ValueError) as err:
        raise SourceError(f"parquet:{uri} can't be read: {err}") from None
    images = table.column("image").to_pylist()  # bytes: the type was checked above
    labels = table.column("label").to_pylist() if "label" in columns else [-1] * len(images)
    labels = [-1 if lab is None else lab for lab in labels]
    splits = table.column("split").to_pylist() if "split" in columns else [""] * len(images)
    odd = [v for v in splits if v not in SPLITS] if "split" in columns else []
    if odd:
        raise SourceError(f"parquet:{uri}: split {odd[0]!r} is not one of {', '.join(SPLITS)}; every row of a "
                          "'split' column names its split (or drop the column to have aigc-ray hold out one)")
    bad = [lab for lab in labels if not -1 <= lab < MAX_CLASSES]
    if bad:
        raise SourceError(f"parquet:{uri}: label {bad[0]} out of range; labels are 0..{MAX_CLASSES - 1}, "
                          "or -1 for unlabelled")
    n_classes = max(labels, default=-1) + 1
    records = (Record(f"parquet/{i}", img or b"", lab, skip="file_too_large" if img and len(img) > max_file_bytes else "",
                      split=split) for i, (img, lab, split) in enumerate(zip(images, labels, splits)))
    return Source(f"parquet:{uri}", [str(c) for c in range(n_classes)], records, len(images))

