"""`aigc-ray prepare`: clean and convert a source into Parquet shards plus a manifest.

Cleaning drops undecodable files, blank (near-constant) images and exact duplicates
(same decoded pixels), each counted in the manifest. Conversion makes every image the
same size and channel count and stores PNG bytes. A deterministic ~20% hold-out split
("test") feeds the quality floor. The source is only read. Everything is written to a
temporary sibling directory that is renamed into place after the manifest is written,
so an interrupted prepare never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.transforms.v2 import functional as TF

from aigc_ray import storage
from aigc_ray.data.sources import Source, open_source

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "aigc-ray-prepared/1"
ROWS_PER_SHARD = 512
TEST_FRACTION = 0.2
BLANK_RANGE = 4  # max - min pixel value at or below which an image counts as blank


class PrepareError(ValueError):
    pass


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset: a local directory or an s3:// / gs:// / file:// URI."""
    path = storage.join(str(directory), MANIFEST)
    if not storage.exists(path):
        raise PrepareError(f"{directory} is not a prepared dataset (no {MANIFEST}); run `aigc-ray prepare`")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"{path} is not valid JSON ({err}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PrepareError(f"{path} is not a {MANIFEST_FORMAT} manifest; prepare the dataset again")
    return manifest


def shard_files(directory: str | Path, split: str) -> list[str]:
    """The split's shard paths, each one's schema checked (footer only) before anyone reads a
    cell: a prepared directory may come from someone else (see data/schema.py)."""
    from aigc_ray.data.schema import check_image_schema

    manifest = read_manifest(directory)
    files = []
    for name in manifest["shards"][split]:
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise PrepareError(f"{directory}/{MANIFEST}: shard name {name!r} is not a file in the directory")
        path = storage.join(str(directory), name)
        check_image_schema(storage.parquet_schema(path), path, require_label=True)
        files.append(path)
    return files


def _to_chw(payload: np.ndarray | bytes) -> torch.Tensor | None:
    """Decode to a uint8 tensor (C, H, W), or None when the bytes are not an image."""
    if isinstance(payload, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(payload)).permute(2, 0, 1)
    try:
        return decode_image(torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError):
        return None


def convert(image: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) of any size/channels -> uint8 (channels, image_size, image_size)."""
    if image.shape[0] in (2, 4):  # drop alpha
        image = image[:-1]
    if channels == 1 and image.shape[0] == 3:
        image = TF.rgb_to_grayscale(image)
    elif channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    h, w = image.shape[-2:]
    if h != w:  # centre-crop to a square first so nothing is stretched
        image = TF.center_crop(image, [min(h, w)])
    if image.shape[-1] != image_size:
        image = TF.resize(image, [image_size, image_size], antialias=True)
    return image.contiguous()


def prepare(dataset: str, out: str | Path, *, image_size: int = 16, channels: int = 1,
            data_root: str = "~/.cache/aigc-ray", download: bool = False, num_shapes: int = 4096,
            seed: int = 42, overwrite: bool = False, quiet: bool = False,
            source: Source | None = None) -> dict[str, Any]:
    if storage.is_uri(str(out)):  # shared storage: prepare locally, then upload (manifest last)
        if storage.exists(storage.join(str(out), MANIFEST)) and not overwrite:
            raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="aigc-prepare-") as tmp:
            local = Path(tmp, "prepared")
            manifest = prepare(dataset, local, image_size=image_size, channels=channels, data_root=data_root,
                               download=download, num_shapes=num_shapes, seed=seed, quiet=quiet, source=source)
            manifest_bytes = (local / MANIFEST).read_bytes()
            (local / MANIFEST).unlink()
            storage.upload_dir(str(local), str(out))
            storage.write_bytes(storage.join(str(out), MANIFEST), manifest_bytes)
        return manifest
    out = Path(out).expanduser()
    if (out / MANIFEST).exists() and not overwrite:
        raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise PrepareError(f"{out} exists and is not a prepared dataset; choose an empty or new directory")
    source = source or open_source(dataset, data_root=data_root, download=download,
                                   image_size=image_size, num_shapes=num_shapes, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_shards(source, tmp, image_size, channels, seed, quiet)
        manifest.update(dataset=dataset, image_size=image_size, channels=channels, seed=seed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic on one filesystem: out appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_shards(source: Source, tmp: Path, image_size: int, channels: int, seed: int,
                  quiet: bool) -> dict[str, Any]:
    dropped = {"undecodable": 0, "blank": 0, "duplicate": 0}
    seen: set[bytes] = set()
    rows: dict[str, list[tuple[bytes, int]]] = {"train": [], "test": []}
    shards: dict[str, list[str]] = {"train": [], "test": []}
    per_class: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    content = hashlib.sha256()
    started, done = time.monotonic(), 0

    def flush(split: str) -> None:
        if not rows[split]:
            return
        name = f"{split}-{len(shards[split]):05d}.parquet"
        images, labels = zip(*rows[split])
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
        pq.write_table(table, tmp / name)
        shards[split].append(name)
        rows[split] = []

    for record in source.records:
        done += 1
        if not quiet and done % 2000 == 0:
            total = f"/{source.size_hint}" if source.size_hint else ""
            print(f"prepare: {done}{total} images read ({time.monotonic() - started:.0f}s)", file=sys.stderr)
        image = _to_chw(record.payload)
        if image is None or image.ndim != 3 or image.numel() == 0:
            dropped["undecodable"] += 1
            continue
        if int(image.max()) - int(image.min()) <= BLANK_RANGE:
            dropped["blank"] += 1
            continue
        fingerprint = hashlib.sha256(str(tuple(image.shape)).encode() + image.numpy().tobytes()).digest()
        if fingerprint in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(fingerprint)
        png = encode_png(convert(image, image_size, channels), compression_level=6).numpy().tobytes()
        # split by a hash of the pixels, so the split doesn't depend on source order
        split = "test" if int.from_bytes(fingerprint[:4], "big") / 2**32 < TEST_FRACTION else "train"
        content.update(png + record.label.to_bytes(8, "big", signed=True))
        rows[split].append((png, record.label))
        counts = per_class[split]
        counts[str(record.label)] = counts.get(str(record.label), 0) + 1
        if len(rows[split]) >= ROWS_PER_SHARD:
            flush(split)
    for split in rows:
        flush(split)
    kept = sum(sum(c.values()) for c in per_class.values())
    if kept == 0:
        raise PrepareError(f"{source.name}: no usable images (dropped: {dropped})")
    labelled = bool(source.class_names) and all(k != "-1" for c in per_class.values() for k in c)
    return {"format": MANIFEST_FORMAT, "source": source.name, "content_hash": content.hexdigest(),
            "counts": {s: sum(c.values()) for s, c in per_class.items()}, "per_class": per_class,
            "class_names": source.class_names if labelled else [], "num_classes": len(source.class_names) if labelled else 0,
            "dropped": dropped, "read": done, "shards": shards}
