"""Local paths and s3:// / gs:// URIs through pyarrow's filesystems (no Ray).

Shared storage is how what one node writes (checkpoints, sample grids, prepared data)
is read by another; a plain local path works on one machine or a shared mount.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """Absolute local path, or the URI unchanged."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, a sweep's history); [] if it isn't there."""
    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode().splitlines() if line.strip()]


def parquet_schema(path: str):
    """A Parquet file's Arrow schema, from its footer alone (no cell is read)."""
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    return pq.read_schema(p, filesystem=fs)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def localize(path: str, cache_dir: str | None = None) -> str:
    """A local directory holding ``path``'s files: the path itself when local, else a
    downloaded copy (used to load checkpoints from s3:// or gs://)."""
    if not is_uri(path):
        return str(Path(path).expanduser())
    target = tempfile.mkdtemp(prefix="aigc-ckpt-", dir=cache_dir)
    src_fs, src = pafs.FileSystem.from_uri(path)
    pafs.copy_files(src, target, source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory's files to ``dest`` (local path or URI)."""
    dst_fs, dst = _fs(dest)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), dst, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dst_fs)
