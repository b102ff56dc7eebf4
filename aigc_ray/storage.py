"""Local paths and s3:// / gs:// URIs through pyarrow's filesystems (no Ray).

Shared storage is how what one node writes (checkpoints, sample grids, prepared data)
is read by another; a plain local path works on one machine or a shared mount.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """Absolute local path, or the URI unchanged."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def in_scheme_of(base: str, path: str) -> str:
    """A path Ray gives inside its filesystem ("bucket/run/ckpt" on s3) as a URI of ``base``'s scheme; a path
    under a local ``base``, or one that is a URI already, unchanged."""
    return f"{base.split('://')[0]}://{path}" if is_uri(base) and not is_uri(path) else path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def write_bytes(path: str, data: bytes) -> None:
    """Replace a whole file atomically: a reader (or a restart after a kill or a full disk) sees
    the old content or the new, never a torn file. See write_to."""
    fs, p = _fs(path)
    write_to(fs, p, data)


def write_to(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """The one writer of state files (JSON, JSONL, cards, manifests' uploads). Local: a temp file
    beside the target, flushed to disk, renamed over it. Object stores (s3://, gs://): one
    upload, which they make visible whole or not at all."""
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, value: Any, indent: int | None = 2) -> None:
    write_bytes(path, json.dumps(value, indent=indent, default=str).encode())


def warn(message: str) -> None:
    """A recoverable problem with a state file: said on stderr, never raised."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json(path: str) -> Any | None:
    """A JSON state file's value, or None (with a warning) if it is torn or not JSON; None if absent."""
    if not exists(path):
        return None
    try:
        return json.loads(read_bytes(path))
    except (ValueError, UnicodeDecodeError) as err:
        warn(f"{path} is not valid JSON ({err}); ignoring it")
        return None


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, a sweep's history); [] if it isn't there.
    A torn line (a kill mid-write by an older version, a copy cut short) is dropped with a
    warning rather than failing every restart."""
    if not exists(path):
        return []
    records = []
    lines = read_bytes(path).decode(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            where = "its last line" if number == len(lines) else f"line {number}"
            warn(f"{path}: {where} is torn or not a JSON object; skipping it")
            continue
        records.append(record)
    return records


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
    downloaded copy (used to load checkpoints from s3:// or gs://). The copy is removed when
    the process exits; prefer ``localized``, which removes it as soon as its block ends."""
    if not is_uri(path):
        return str(Path(path).expanduser())
    target = _download(path, cache_dir)
    _REMOVE_AT_EXIT.append(target)
    return target


@contextlib.contextmanager
def localized(path: str, cache_dir: str | None = None):
    """``localize`` for one block: yields the local directory, and removes a downloaded copy after."""
    if not is_uri(path):
        yield str(Path(path).expanduser())
        return
    target = _download(path, cache_dir)
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _download(path: str, cache_dir: str | None) -> str:
    target = tempfile.mkdtemp(prefix="aigc-ckpt-", dir=cache_dir)
    try:
        src_fs, src = pafs.FileSystem.from_uri(path)
        pafs.copy_files(src, target, source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # a failed download leaves nothing behind either
        raise
    return target


_REMOVE_AT_EXIT: list[str] = []


@atexit.register
def _remove_downloads() -> None:
    for target in _REMOVE_AT_EXIT:
        shutil.rmtree(target, ignore_errors=True)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory's files to ``dest`` (local path or URI)."""
    dst_fs, dst = _fs(dest)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(os.path.abspath(local_dir), dst, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dst_fs)
