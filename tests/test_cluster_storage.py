"""Shared storage: prepared datasets, checkpoints and run outputs on URIs (pyarrow filesystems).

s3:// and gs:// go through the same pyarrow code paths as the file:// URIs used here, so what
one node writes another reads; no cloud credentials are needed to test them.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from aigc_ray import storage
from aigc_ray.data.pipeline import ensure_prepared, load_split, prepared_dir
from aigc_ray.data.prepare import MANIFEST, PrepareError, prepare, read_manifest, shard_files


def test_prepare_to_a_uri_matches_a_local_prepare(tmp_path):
    uri = (tmp_path / "bucket" / "digits8").as_uri()  # file:///.../bucket/digits8
    local = prepare("digits", tmp_path / "local", image_size=8, quiet=True)
    remote = prepare("digits", uri, image_size=8, quiet=True)
    assert remote["content_hash"] == local["content_hash"]
    assert read_manifest(uri)["content_hash"] == local["content_hash"]
    files = shard_files(uri, "train")
    assert files and all(f.startswith("file://") for f in files)
    x_uri, y_uri = load_split(uri, "test")
    x_loc, y_loc = load_split(str(tmp_path / "local"), "test")
    assert torch.equal(x_uri, x_loc) and torch.equal(y_uri, y_loc)
    assert not list((tmp_path / "bucket").glob(".*partial*"))  # nothing half-written left behind
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare("digits", uri, image_size=8, quiet=True)


def test_cli_prepare_accepts_a_uri_and_prints_it(tmp_path, capsys):
    from aigc_ray.cli import main

    uri = (tmp_path / "store" / "prep").as_uri()
    assert main(["prepare", "--dataset", "digits", "--image-size", "8", "--out", uri]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == uri
    assert (tmp_path / "store" / "prep" / MANIFEST).is_file()


def test_data_root_on_a_uri_is_prepared_once_and_reused(tmp_path):
    root = (tmp_path / "shared").as_uri()
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": root})
    path = ensure_prepared(cfg.data, cfg.train.seed)
    assert path == prepared_dir(cfg.data, cfg.train.seed) and path.startswith(root + "/prepared/")
    manifest_file = tmp_path / "shared" / "prepared" / path.rsplit("/", 1)[-1] / MANIFEST
    stamp = manifest_file.stat().st_mtime_ns
    assert ensure_prepared(cfg.data, cfg.train.seed) == path  # cached: not prepared again
    assert manifest_file.stat().st_mtime_ns == stamp
    # a prepared dataset on a URI is used in place through parquet:URI
    direct = tiny_config(tmp_path).with_overrides({"data.dataset": f"parquet:{path}"})
    assert ensure_prepared(direct.data, direct.train.seed) == path


def test_training_reads_and_writes_uris(ray_session, tmp_path):
    """Dataset from parquet:file://..., checkpoints and run files to --storage-path file://...;
    the reported checkpoint is a URI that `generate` / Serve can load anywhere."""
    from aigc_ray.pipeline import GeneratorPipeline
    from aigc_ray.train.loop import run_training

    data_uri = (tmp_path / "bucket" / "data" / "digits8").as_uri()
    prepare("digits", data_uri, image_size=8, quiet=True)
    runs_uri = (tmp_path / "bucket" / "runs").as_uri()
    cfg = tiny_config(tmp_path).with_overrides({
        "data.dataset": f"parquet:{data_uri}", "train.storage_path": runs_uri, "train.max_steps": 10,
        "train.epochs": 1, "train.name": "uri-run"})
    outcome = run_training(cfg)
    assert outcome.run_dir == runs_uri + "/uri-run"
    assert outcome.checkpoint.startswith(runs_uri + "/uri-run/checkpoint_")
    assert storage.exists(storage.join(outcome.checkpoint, "model.safetensors"))
    lines = storage.read_bytes(storage.join(outcome.run_dir, "metrics.jsonl")).decode().splitlines()
    assert json.loads(lines[-1])["step"] > 0
    pipe = GeneratorPipeline.from_checkpoint(storage.localize(outcome.checkpoint))
    assert pipe.generate([1, 2]).shape == (2, 1, 8, 8)


def test_downloaded_checkpoint_copies_are_removed(tmp_path):
    """A checkpoint read from a URI is copied to a temporary directory: `localized` removes it when its block
    ends (also on an error), `localize` when the process exits, a failed download at once."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "bucket" / "ckpt"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    with storage.localized(src.as_uri(), cache_dir=str(cache)) as local:
        assert (Path(local) / "config.json").read_text() == "{}" and Path(local).parent == cache
    assert not list(cache.iterdir())
    with pytest.raises(RuntimeError), storage.localized(src.as_uri(), cache_dir=str(cache)):
        raise RuntimeError("the caller failed")
    assert not list(cache.iterdir())
    with pytest.raises(OSError):
        storage.localize((tmp_path / "bucket" / "missing").as_uri(), cache_dir=str(cache))
    assert not list(cache.iterdir())
    with storage.localized(str(src)) as local:  # a local path is used in place, and kept
        assert local == str(src)
    assert (src / "config.json").is_file()

    code = (f"from aigc_ray import storage; from pathlib import Path; d = storage.localize({src.as_uri()!r}, "
            f"cache_dir={str(cache)!r}); assert (Path(d) / 'config.json').is_file(); print(d)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert Path(out.stdout.strip()).parent == cache and not list(cache.iterdir())
