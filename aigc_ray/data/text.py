"""Text data: sources -> cleaned UTF-8 documents -> byte-token shards with a deterministic split.

Sources:
  stdlib        a fixed list of the running Python's standard-library modules (STDLIB_FILES), offline on
                every installation; the same Python version gives the same bytes (the manifest records
                their content hash, so a patched stdlib is visible as a different hash)
  text:PATH     a UTF-8 file, or a folder of them (walked in sorted order; symlinks out of it not followed)
  parquet:PATH  a Parquet file or folder with a ``text`` string column (its type checked in the footer
                before any cell is converted)

Cleaning, counted by reason in manifest.json: ``skipped.file_too_large`` (judged from the size before
reading), ``dropped.not_utf8``, ``dropped.empty`` (nothing but whitespace), ``dropped.duplicate`` (the exact
bytes of an earlier document). An empty result is an error, not an empty run.

Output (written to a temp directory and renamed, so an interrupted prepare leaves nothing complete-looking):
  train.tokens, validation.tokens   raw uint8 byte ids (the vocabulary is the 256 byte values)
  manifest.json                     counts, reasons, the sources' and the tokens' sha256, the split rule
The documents are joined with a blank line, cut into CHUNK_BYTES chunks, and every validation_every-th chunk
is validation: deterministic, spread over the whole corpus, and no fitted vocabulary to leak.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK_BYTES = 4096
SEPARATOR = b"\n\n"
FORMAT = "aigc-ray-text/1"
SPLITS = ("train", "validation")
STDLIB_FILES = (  # 33 pure-Python modules, about 1.4 MB on CPython 3.11
    "argparse.py", "collections/__init__.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "pprint.py", "random.py",
    "shutil.py", "string.py", "textwrap.py", "typing.py", "heapq.py", "bisect.py", "contextlib.py", "abc.py",
    "copy.py", "csv.py", "difflib.py", "fractions.py", "statistics.py", "tempfile.py", "threading.py",
    "queue.py", "calendar.py", "datetime.py", "gettext.py", "glob.py", "fnmatch.py")


class TextDataError(ValueError):
    """The source cannot give a corpus; the message says why (and names the source)."""


def _stdlib_docs(max_file_bytes: int, counts: dict) -> Iterator[tuple[str, bytes]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for rel in STDLIB_FILES:
        path = root / rel
        if not path.is_file():  # a trimmed installation: counted, the rest still make a corpus
            counts["skipped"]["missing"] += 1
            continue
        yield from _read_file(path, rel, max_file_bytes, counts)


def _read_file(path: Path, name: str, max_file_bytes: int, counts: dict) -> Iterator[tuple[str, bytes]]:
    if path.stat().st_size > max_file_bytes:  # judged before reading a byte
        counts["skipped"]["file_too_large"] += 1
        return
    yield name, path.read_bytes()


def _folder_docs(source: Path, max_file_bytes: int, counts: dict) -> Iterator[tuple[str, bytes]]:
    if source.is_file():
        yield from _read_file(source, source.name, max_file_bytes, counts)
        return
    if not source.is_dir():
        raise TextDataError(f"data.dataset: text:{source} is neither a file nor a folder")
    root = source.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if root not in path.resolve().parents:  # a symlink out of the source
                counts["skipped"]["outside_source"] += 1
                continue
            if name.startswith("."):
                continue
            yield from _read_file(path, str(path.relative_to(root)), max_file_bytes, counts)


def _parquet_docs(source: str, max_file_bytes: int, counts: dict) -> Iterator[tuple[str, bytes]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(source).rglob("*.parquet")) if Path(source).is_dir() else [Path(source)]
    if not files or not files[0].is_file():
        raise TextDataError(f"data.dataset: parquet:{source} has no Parquet files")
    for file in files:
        schema = pq.read_schema(file)  # the footer only: types checked before any cell is converted
        if "text" not in schema.names:
            raise TextDataError(f"data.dataset: {file.name} has no 'text' column (columns: {schema.names})")
        kind = schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise TextDataError(f"data.dataset: {file.name}: column 'text' is {kind}, expected a string column")
        column = pq.read_table(file, columns=["text"]).column("text")
        for i, cell in enumerate(column.to_pylist()):
            if cell is None:
                counts["dropped"]["empty"] += 1
                continue
            data = cell.encode("utf-8") if isinstance(cell, str) else bytes(cell)
            if len(data) > max_file_bytes:
                counts["skipped"]["file_too_large"] += 1
                continue
            yield f"{file.name}#{i}", data


def documents(dataset: str, max_file_bytes: int) -> tuple[list[tuple[str, bytes]], dict]:
    """The cleaned documents (name, UTF-8 bytes) of a source, and the counts of what was left out."""
    counts = {"dropped": Counter(), "skipped": Counter()}
    kind, _, arg = dataset.partition(":")
    if dataset == "stdlib":
        raw = _stdlib_docs(max_file_bytes, counts)
    elif kind == "text" and arg:
        raw = _folder_docs(Path(arg).expanduser(), max_file_bytes, counts)
    elif kind == "parquet" and arg:
        raw = _parquet_docs(arg, max_file_bytes, counts)
    else:
        raise TextDataError(f"data.dataset={dataset!r}: a text dataset is stdlib, text:PATH or parquet:PATH")
    kept, seen = [], set()
    for name, data in raw:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            counts["dropped"]["not_utf8"] += 1
            continue
        if not data.strip():
            counts["dropped"]["empty"] += 1
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            counts["dropped"]["duplicate"] += 1
            continue
        seen.add(digest)
        kept.append((name, data))
    return kept, {k: dict(v) for k, v in counts.items()}


def split_tokens(docs: list[tuple[str, bytes]], validation_every: int) -> dict[str, np.ndarray]:
    """Join the documents, cut the stream into CHUNK_BYTES chunks; chunk i is validation when
    i % validation_every == validation_every - 1. Returns uint8 arrays per split."""
    stream = np.frombuffer(SEPARATOR.join(d for _, d in docs), dtype=np.uint8)
    n_chunks = -(-len(stream) // CHUNK_BYTES)
    is_val = (np.arange(n_chunks) % validation_every) == validation_every - 1
    chunks = [stream[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES] for i in range(n_chunks)]
    return {"train": np.concatenate([c for c, v in zip(chunks, is_val) if not v] or [stream[:0]]),
            "validation": np.concatenate([c for c, v in zip(chunks, is_val) if v] or [stream[:0]])}


def prepare_text(dataset: str, out: str | Path, *, max_file_bytes: int = 64 * 2**20, validation_every: int = 10,
                 overwrite: bool = False) -> dict:
    """Clean and tokenise ``dataset`` into ``out`` (see the module docstring); returns the manifest."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TextDataError(f"{out} exists and is not empty (give --overwrite to replace it)")
    docs, counts = documents(dataset, max_file_bytes)
    if not docs:
        raise TextDataError(f"data.dataset={dataset!r}: the corpus is empty after cleaning "
                            f"(dropped {counts['dropped']}, skipped {counts['skipped']})")
    splits = split_tokens(docs, validation_every)
    if len(splits["validation"]) == 0 or len(splits["train"]) == 0:
        raise TextDataError(f"data.dataset={dataset!r}: {sum(len(d) for _, d in docs)} bytes are too few for a "
                            f"train and a validation split ({CHUNK_BYTES}-byte chunks, every {validation_every}th "
                            "for validation)")
    source_hash = hashlib.sha256()
    for _name, data in docs:
        source_hash.update(hashlib.sha256(data).digest())
    manifest = {"format": FORMAT, "source": dataset, "documents": len(docs),
                "python": sys.version.split()[0] if dataset == "stdlib" else None,
                "counts": {s: int(len(a)) for s, a in splits.items()}, **counts,
                "split": {"chunk_bytes": CHUNK_BYTES, "validation_every": validation_every},
                "vocab": "bytes", "source_hash": source_hash.hexdigest(),
                "content_hash": hashlib.sha256(b"".join(splits[s].tobytes() for s in SPLITS)).hexdigest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, tokens in splits.items():
            (tmp / f"{split}.tokens").write_bytes(tokens.tobytes())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def ensure_prepared_text(data_cfg) -> str:
    """The prepared directory for ``data_cfg`` under data_root (prepared once, reused by its key)."""
    key = hashlib.sha256(json.dumps([data_cfg.dataset, data_cfg.max_file_bytes, data_cfg.validation_every,
                                     sys.version.split()[0], FORMAT]).encode()).hexdigest()[:16]
    out = Path(data_cfg.data_root).expanduser() / "prepared" / f"text-{key}"
    if not (out / "manifest.json").is_file():
        prepare_text(data_cfg.dataset, out, max_file_bytes=data_cfg.max_file_bytes,
                     validation_every=data_cfg.validation_every, overwrite=True)
    return str(out)


def read_text_manifest(prepared: str | Path) -> dict:
    manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise TextDataError(f"{prepared} is not a prepared text dataset")
    return manifest


def load_tokens(prepared: str | Path, split: str) -> np.ndarray:
    """The split's byte ids, uint8 (N,), memory-mapped (read-only)."""
    return np.memmap(Path(prepared) / f"{split}.tokens", dtype=np.uint8, mode="r")
