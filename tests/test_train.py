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
def test_two_workers_survive_a_killed_worker_and_a_rerun_resumes(ray_session, tmp_path, data_root):
    """One run (a Train run costs ~15 s here, whatever it trains): two DDP workers write checkpoints;
    one worker is killed mid-run (SIGKILL, as a crash) and the run restarts once from its last
    checkpoint and finishes; a rerun of the same name with a larger budget continues from there."""
    from ray.util.state import list_actors

    every, epochs = 20, 12  # 12 epochs of ~44 two-worker steps: still training when the kill lands
    cfg = tiny_config(tmp_path).with_overrides({
        "data.data_root": str(data_root), "train.workers": 2, "train.epochs": epochs, "train.checkpoint_every": every,
        "train.sample_every": 4, "train.max_failures": 2, "train.name": "two-workers",
        "eval.enabled": False})  # this test is about the latest checkpoint; test_eval.py covers the best one
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_run(cfg)), daemon=True)
    thread.start()
    run_dir = Path(cfg.train.out) / "two-workers"
    deadline = time.monotonic() + 180
    while not _registered_checkpoints(run_dir):  # wait until Ray Train has registered one
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was written"
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    os.kill(workers[1].pid, signal.SIGKILL)  # a real crash of one rank: no cleanup, no exception in Python
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    first = outcome["result"]
    meta, state = read_meta(first.checkpoint), load_train_state(first.checkpoint)
    # 1,413 train digits split over 2 workers, 16 per worker-batch -> ~44 steps per epoch
    steps_per_epoch = meta["step"] // epochs
    assert 35 <= steps_per_epoch <= 50 and meta["epoch"] == epochs and meta["step"] == epochs * steps_per_epoch
    assert len(state["resumes"]) == 1, "the run should have restarted exactly once"
    assert every <= state["resumes"][0] < meta["step"]  # from a checkpoint, not from scratch
    assert {"generator", "discriminator", "opt_g", "opt_d", "ema"} <= set(state)
    assert GeneratorPipeline.from_checkpoint(first.checkpoint).generate([1, 2]).shape == (2, 1, 8, 8)
    history = [json.loads(line) for line in Path(first.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history][-1] == epochs and all(h["images_per_s"] > 0 for h in history)
    assert Path(first.run_dir, "samples", f"epoch_{epochs:03d}.png").stat().st_size > 0

    # the same run name with a larger budget continues from the checkpoint, not from scratch
    resumed = _run(cfg.with_overrides({"train.epochs": epochs + 1}))
    meta2, state2 = read_meta(resumed.checkpoint), load_train_state(resumed.checkpoint)
    assert meta2["epoch"] == epochs + 1 and meta2["step"] == (epochs + 1) * steps_per_epoch
    assert state2["resumes"] == [*state["resumes"], meta["step"]]
    history = [json.loads(line) for line in Path(first.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert sorted({h["epoch"] for h in history}) == list(range(1, epochs + 2))


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
