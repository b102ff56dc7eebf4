"""Resuming a run (a rerun of ``--name R``, or Ray Train restarting its workers): the run's
checkpoints must fit the model it now asks for, and a latest checkpoint whose train_state.pt
can't be loaded gives way to the one before it, with a warning, instead of a crash loop."""

from __future__ import annotations

import dataclasses

import pyarrow.fs as pafs

from aigc_ray import storage
from aigc_ray.config import ExperimentConfig, ModelConfig
from aigc_ray.models.checkpoint import CONFIG, CheckpointError, load_train_state, weight_shapes


def run_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories (paths or URIs), newest (highest step) first."""
    fs, path = storage._fs(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    found = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            meta = storage.read_json(storage.join(run_dir, info.base_name, CONFIG))
            if isinstance(meta, dict):
                found.append((meta.get("step", 0) if isinstance(meta.get("step"), int) else 0, info.base_name, meta))
    return [storage.join(run_dir, name) for _, name, _ in sorted(found, reverse=True)]


def check_resumable(run_dir: str, cfg: ExperimentConfig) -> None:
    """Driver side, before any worker starts: a rerun whose model config changes the weights'
    shapes can't resume its checkpoints. Differences that keep the shapes (model.beta, ...) resume."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        return
    meta = storage.read_json(storage.join(checkpoints[0], CONFIG))
    old = meta.get("model", {}) if isinstance(meta, dict) else {}
    new = dataclasses.asdict(cfg.model)
    changed = sorted(k for k in new if old.get(k) != new[k])
    if not changed:
        return
    try:
        previous = ModelConfig(**old)
        same = all(weight_shapes(previous, d) == weight_shapes(cfg.model, d) for d in (False, True))
    except (TypeError, ValueError):
        same = False
    if not same:
        was = ", ".join(f"model.{k}={old.get(k)!r}" for k in changed)
        now = ", ".join(f"model.{k}={new[k]!r}" for k in changed)
        raise ValueError(f"run {cfg.run_name!r} has checkpoints with {was} but this run asks for {now}, which "
                         f"changes the weights' shapes; start a new run with a new --name (or drop --name)")


def load_resume_state(checkpoint, run_dir: str) -> tuple[dict, str]:
    """(train state, where it came from): the given Ray checkpoint's, or, if its train_state.pt
    can't be loaded, the newest earlier checkpoint of the run that loads (with a warning)."""
    try:
        with checkpoint.as_directory() as directory:
            state = load_train_state(directory)
        if state is None:
            raise CheckpointError("no train_state.pt")
        return state, checkpoint.path
    except Exception as err:  # a torn or corrupt file: torch.load raises many kinds
        first_error = err
    latest = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    for candidate in run_checkpoints(run_dir):
        if candidate.rstrip("/").rsplit("/", 1)[-1] == latest:
            continue
        try:
            with storage.localized(candidate) as local:
                state = load_train_state(local)
        except Exception:  # noqa: BLE001 - try the next older one
            continue
        if state is not None:
            storage.warn(f"{checkpoint.path}: train_state.pt can't be loaded ({first_error}); "
                         f"resuming from the previous checkpoint {candidate}")
            return state, candidate
    raise CheckpointError(f"{checkpoint.path}: train_state.pt can't be loaded ({first_error}) and no earlier "
                          "checkpoint of the run can; start a new run with a new --name")
