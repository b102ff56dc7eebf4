"""Ray Train on a real local Ray: multi-worker DDP, checkpoints, resume, a killed worker."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config

from aigc_ray.models.checkpoint import load_train_state, read_meta
from aigc_ray.pipeline import GeneratorPipeline


def _run(cfg):
    from aigc_ray.train.loop import run_training

    return run_training(cfg)


@pytest.mark.slow
def test_two_workers_train_write_a_checkpoint_and_resume(ray_session, tmp_path, data_root):
    cfg = tiny_config(tmp_path).with_overrides({
        "data.data_root": str(data_root), "train.workers": 2, "train.epochs": 1, "train.name": "two-workers",
        "eval.enabled": False})  # this test is about the latest checkpoint; test_eval.py covers the best one
    first = _run(cfg)
    meta = read_meta(first.checkpoint)
    state = load_train_state(first.checkpoint)
    # 1,437 train digits split over 2 workers, 16 per worker-batch -> ~44 steps per epoch
    steps_per_epoch = meta["step"]
    assert 35 <= steps_per_epoch <= 50 and meta["epoch"] == 1
    assert {"generator", "discriminator", "opt_g", "opt_d", "ema"} <= set(state)
    assert GeneratorPipeline.from_checkpoint(first.checkpoint).generate([1, 2]).shape == (2, 1, 8, 8)
    history = [json.loads(line) for line in Path(first.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1] and history[0]["images_per_s"] > 0
    assert Path(first.run_dir, "samples", "epoch_001.png").stat().st_size > 0

    # the same run name with a larger budget continues from the checkpoint, not from scratch
    resumed = _run(cfg.with_overrides({"train.epochs": 2}))
    meta2, state2 = read_meta(resumed.checkpoint), load_train_state(resumed.checkpoint)
    assert meta2["epoch"] == 2 and meta2["step"] == 2 * steps_per_epoch
    assert state2["resumes"] == [steps_per_epoch]
    history = [json.loads(line) for line in Path(first.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path, data_root):
    from ray.util.state import list_actors

    every, epochs = 20, 40  # ~1,800 tiny steps: enough that the run is still going when the kill lands
    cfg = tiny_config(tmp_path).with_overrides({
        "data.data_root": str(data_root), "train.epochs": epochs, "train.checkpoint_every": every,
        "train.sample_every": 10, "train.max_failures": 2, "train.name": "killed", "eval.enabled": False})
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_run(cfg)), daemon=True)
    thread.start()
    run_dir = Path(cfg.train.out) / "killed"
    deadline = time.monotonic() + 180
    while not _registered_checkpoints(run_dir):  # wait until Ray Train has registered one
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was written"
        time.sleep(0.2)
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert workers, "no live training worker found"
    os.kill(workers[0].pid, signal.SIGKILL)  # a real crash: no cleanup, no exception in Python
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    final = outcome["result"].checkpoint
    state, meta = load_train_state(final), read_meta(final)
    assert meta["epoch"] == epochs
    assert len(state["resumes"]) == 1, "the run should have restarted exactly once"
    # it restarted from a checkpoint, not from scratch
    assert state["resumes"][0] >= every


def _registered_checkpoints(run_dir: Path) -> list:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def test_bad_class_count_fails_before_training(ray_session, tmp_path, data_root):
    cfg = tiny_config(tmp_path).with_overrides({"data.data_root": str(data_root), "model.num_classes": 3})
    with pytest.raises(ValueError, match="10 classes"):
        _run(cfg)
