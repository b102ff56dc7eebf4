"""Resuming a run: a rerun that changes the weights' shapes is a clear error before any worker
starts; a corrupt latest checkpoint gives way to the previous one; a torn metrics.jsonl doesn't
stop a run from resuming."""

import pytest
import torch
from conftest import tiny_config
from ray.train import Checkpoint

from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import save_checkpoint
from aigc_ray.train.resume import check_resumable, load_resume_state


def _checkpoint(run_dir, name, cfg, step):
    save_checkpoint(run_dir / name, experiment=cfg, served_state=build_generator(cfg.model).state_dict(), step=step,
                    epoch=step, ema=False, dataset={}, train_state={"epoch": step, "batch_in_epoch": 0})
    return run_dir / name


def test_a_shape_changing_rerun_names_the_fields_and_the_way_out(tmp_path):
    cfg = tiny_config(tmp_path, "vae").with_overrides({"train.name": "R"})
    run = tmp_path / "runs" / "R"
    _checkpoint(run, "checkpoint_1", cfg, 1)
    check_resumable(str(run), cfg.with_overrides({"model.options.beta": 4.0}))  # same shapes: resumes
    with pytest.raises(ValueError, match=r"model.latent_dim=8, model.width=8 but this run asks for "
                                         r"model.latent_dim=16, model.width=16.*new --name"):
        check_resumable(str(run), cfg.with_overrides({"model.width": 16, "model.latent_dim": 16}))
    check_resumable(str(tmp_path / "runs" / "fresh"), cfg.with_overrides({"model.width": 16}))  # nothing to resume


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_a", cfg, 10)
    latest = _checkpoint(run, "checkpoint_b", cfg, 20)
    state, source = load_resume_state(Checkpoint.from_directory(str(latest)), str(run))
    assert state["epoch"] == 20 and source == str(latest)
    (latest / "train_state.pt").write_bytes((latest / "train_state.pt").read_bytes()[:100])  # torn
    state, source = load_resume_state(Checkpoint.from_directory(str(latest)), str(run))
    assert state["epoch"] == 10 and source.endswith("checkpoint_a")
    assert "resuming from the previous checkpoint" in capsys.readouterr().err
    torch.save({"x": 1}, run / "checkpoint_a" / "garbage")  # unrelated files don't matter
    (run / "checkpoint_a" / "train_state.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no earlier checkpoint of the run can; start a new run"):
        load_resume_state(Checkpoint.from_directory(str(latest)), str(run))


@pytest.mark.slow
def test_a_run_with_a_corrupt_latest_checkpoint_and_torn_metrics_resumes(ray_session, tmp_path, capfd):
    from pathlib import Path

    from aigc_ray.train.loop import run_training
    from aigc_ray.train.resume import run_checkpoints

    cfg = tiny_config(tmp_path).with_overrides({
        "train.name": "R", "train.epochs": 2, "train.checkpoint_every_epochs": 1, "train.checkpoint_every": 10**6,
        "train.keep_checkpoints": 3, "eval.enabled": False, "data.dataset": "shapes", "data.num_shapes": 128})
    first = run_training(cfg)
    latest = Path(run_checkpoints(first.run_dir)[0])
    (latest / "train_state.pt").write_bytes(b"PK\x03\x04 torn")
    metrics = Path(first.run_dir, "metrics.jsonl")
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "lo')
    with pytest.raises(ValueError, match="model.width=8 but this run asks for model.width=16"):
        run_training(cfg.with_overrides({"model.width": 16}))
    again = run_training(cfg.with_overrides({"train.epochs": 3}))
    out = capfd.readouterr()
    assert "resuming from the previous checkpoint" in out.err + out.out
    assert "training R: 1 worker x 1 CPU, shapes (" in out.err  # the run's first line: workers, devices, data
    assert again.metrics["epoch"] == 3
