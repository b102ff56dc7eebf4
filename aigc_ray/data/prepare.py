"""`aigc-ray prepare`: clean and convert a source into Parquet shards plus a manifest.

Cleaning drops undecodable files, blank (near-constant) images and exact duplicates
(same decoded pixels), each counted in the manifest. Conversion makes every image the
same size and channel count and stores PNG bytes. The test split, which feeds the quality
floor, is the source's own where it has one (a torchvision dataset's official test set, a
folder's test/, a Parquet ``split`` column), else a deterministic ~20% hold-out by pixel hash.
The source is only read. Everything is written to a temporary sibling directory that is
renamed into place after the manifest is written, so an interrupted prepare never leaves a
directory that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from aigc_ray import storage
from aigc_ray.data.sources import Source, open_source
from aigc_ray.images import encode_png

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "aigc-ray-prepared/1"
ROWS_PER_SHARD = 512
TEST_FRACTION = 0.2
BLANK_RANGE = 4  # max - min pixel value at or below which an image counts as blank
MAX_FILE_BYTES = 64 * 2**20  # per-file caps (prepare's --max-file-bytes / --max-pixels): a file
MAX_PIXELS = 64 * 2**20  # over them is counted under its reason, never read or decoded


PROGRESS_LINE_S = 30.0  # off a terminal (a log), where the bar is off: a progress line this often


class PrepareError(ValueError):
    pass


class _ProgressLines:
    """For a log, where tqdm's bar is off: every PROGRESS_LINE_S seconds, one line with the count, the rate and
    how long the rest will take (a prepare shorter than that prints none)."""

    def __init__(self, name: str, total: int | None, off: bool):
        self.name, self.total, self.off = name, total, off
        self.started = time.monotonic()
        self.due = self.started + PROGRESS_LINE_S

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if self.off or now < self.due:
            return
        self.due = now + PROGRESS_LINE_S
        rate = done / max(now - self.started, 1e-9)
        line = f"prepare {self.name}: {done}" + (f"/{self.total}" if self.total else "") + f" images, {rate:.0f} img/s"
        if self.total and done < self.total:
            left = int((self.total - done) / rate + 0.999)
            line += f", eta {left // 60}m{left % 60:02d}s"
        print(line, file=sys.stderr, flush=True)


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


def _to_chw(payload: np.ndarray | bytes, max_pixels: int) -> tuple[torch.Tensor | None, str]:
    """Decode to a uint8 tensor (C, H, W), or (None, the reason it was dropped). Files are
    decoded with Pillow, whose header gives the size before any pixel is decoded (so the pixel
    cap holds), which converts 16-bit and CMYK correctly and which prints nothing."""
    if isinstance(payload, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(payload)).permute(2, 0, 1), ""
    if not payload:
        return None, "empty"
    try:
        with warnings.catch_warnings():  # EXIF/ICC complaints and the like: the image is judged below
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(payload)) as img:
                if img.width * img.height > max_pixels:
                    return None, "too_many_pixels"
                array = _uint8_array(img)
    except Image.DecompressionBombError:
        return None, "too_many_pixels"
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):  # what Pillow raises on a bad file
        return None, "undecodable"
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.size == 0:
        return None, "undecodable"
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1), ""


def _uint8_array(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) of any Pillow mode: 16/32-bit grey scaled down, CMYK (K
    included) and palette / YCbCr / other modes converted to RGB(A), alpha kept for convert()."""
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit PNG / TIFF grey (I holds them widened)
        return (np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float64).clip(0, 255).round().astype(np.uint8)
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if img.mode in ("P", "PA") or "A" in img.mode else "RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on a read-only one)


def convert(image: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) of any size/channels -> uint8 (channels, image_size, image_size)."""
    from torchvision.transforms.v2 import functional as TF  # here, not at import: see aigc_ray.images

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
            source: Source | None = None, max_file_bytes: int = MAX_FILE_BYTES,
            max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    if storage.is_uri(str(out)):  # shared storage: prepare locally, then upload (manifest last)
        if storage.exists(storage.join(str(out), MANIFEST)) and not overwrite:
            raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="aigc-prepare-") as tmp:
            local = Path(tmp, "prepared")
            manifest = prepare(dataset, local, image_size=image_size, channels=channels, data_root=data_root,
                               download=download, num_shapes=num_shapes, seed=seed, quiet=quiet, source=source,
                               max_file_bytes=max_file_bytes, max_pixels=max_pixels)
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
    source = source or open_source(dataset, data_root=data_root, download=download, image_size=image_size,
                                   num_shapes=num_shapes, seed=seed, max_file_bytes=max_file_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_shards(source, tmp, image_size, channels, quiet, max_pixels)
        manifest.update(dataset=dataset, image_size=image_size, channels=channels, seed=seed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # the old output stays until the new one is complete: moved aside, replaced, then removed
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)  # atomic on one filesystem: out appears complete or not at all
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_shards(source: Source, tmp: Path, image_size: int, channels: int, quiet: bool,
                  max_pixels: int) -> dict[str, Any]:
    dropped = {"undecodable": 0, "blank": 0, "duplicate": 0}  # + any other reason, when it occurs
    skipped: dict[str, int] = {}
    seen: set[bytes] = set()
    rows: dict[str, list[tuple[bytes, int]]] = {"train": [], "test": []}
    shards: dict[str, list[str]] = {"train": [], "test": []}
    per_class: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    content = hashlib.sha256()
    split_by: set[str] = set()  # "source" and/or "hash": who put the images in their split
    done = 0

    def flush(split: str) -> None:
        if not rows[split]:
            return
        name = f"{split}-{len(shards[split]):05d}.parquet"
        images, labels = zip(*rows[split])
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
        pq.write_table(table, tmp / name)
        shards[split].append(name)
        rows[split] = []

    # a bar on a terminal only (None: off when stderr is a file or pipe, where its carriage returns leave
    # stale lines), and only for a prepare that takes a while (delay): the first image's rate, slowed by
    # imports, made the bar of a one-second prepare promise "38:38" left
    progress = tqdm(source.records, total=source.size_hint, desc=f"prepare {source.name}"[:60], unit="img",
                    disable=True if quiet else None, mininterval=1.0, delay=2.0, leave=False)
    lines = _ProgressLines(source.name, source.size_hint, off=quiet or sys.stderr.isatty())
    for record in progress:
        done += 1
        lines.tick(done)
        if record.skip:
            skipped[record.skip] = skipped.get(record.skip, 0) + 1
            continue
        image, reason = _to_chw(record.payload, max_pixels)
        if image is not None and int(image.max()) - int(image.min()) <= BLANK_RANGE:
            image, reason = None, "blank"
        if image is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        fingerprint = hashlib.sha256(str(tuple(image.shape)).encode() + image.numpy().tobytes()).digest()
        if fingerprint in seen:
            dropped["duplicate"] += 1
            continue
        try:
            png = encode_png(convert(image, image_size, channels))
        except (RuntimeError, ValueError) as err:  # a shape or dtype convert() can't handle
            dropped["unconvertible"] = dropped.get("unconvertible", 0) + 1
            if not quiet:
                progress.write(f"prepare: {record.key}: {err}")
            continue
        seen.add(fingerprint)
        if record.split:  # the source's own split (an official test set is the floor's held-out set)
            split = record.split
            split_by.add("source")
        else:  # split by a hash of the pixels, so the split doesn't depend on source order
            split = "test" if int.from_bytes(fingerprint[:4], "big") / 2**32 < TEST_FRACTION else "train"
            split_by.add("hash")
        # a source's split is part of the content (the same images split otherwise are another dataset);
        # a hash split follows from the pixels, so it adds nothing and older hashes stay valid
        content.update(png + record.label.to_bytes(8, "big", signed=True) + (split.encode() if record.split else b""))
        rows[split].append((png, record.label))
        counts = per_class[split]
        counts[str(record.label)] = counts.get(str(record.label), 0) + 1
        if len(rows[split]) >= ROWS_PER_SHARD:
            flush(split)
    progress.close()
    for split in rows:
        flush(split)
    kept = sum(sum(c.values()) for c in per_class.values())
    if kept == 0:
        raise PrepareError(f"{source.name}: no usable images (dropped: {dropped}, skipped: {skipped})")
    if split_by == {"source"} and not all(per_class.values()):  # e.g. every test image a duplicate of a train one
        empty = next(s for s, c in per_class.items() if not c)
        raise PrepareError(f"{source.name}: its own {empty} split kept no usable images (dropped: {dropped}, "
                           f"skipped: {skipped})")
    labelled = bool(source.class_names) and all(k != "-1" for c in per_class.values() for k in c)
    return {"format": MANIFEST_FORMAT, "source": source.name, "content_hash": content.hexdigest(),
            "counts": {s: sum(c.values()) for s, c in per_class.items()}, "per_class": per_class,
            "class_names": source.class_names if labelled else [], "num_classes": len(source.class_names) if labelled else 0,
            "dropped": dropped, "skipped": skipped, "read": done, "shards": shards,
            "split": "+".join(sorted(split_by))}
