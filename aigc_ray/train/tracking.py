"""Experiment tracking: TensorBoard event files in the run directory, beside metrics.jsonl, and (with
`track.mlflow_uri`) an MLflow run opened through Ray's MLflow integration (`setup_mlflow`).

Who writes what, one writer per record, as for the JSON files:
- rank 0 of the Train run (``RunTracker``, called where loop.py writes metrics.jsonl): each epoch's numbers as
  ``train/<metric>`` (losses, D outputs, images/s, epoch time), the epoch's sample grid (``samples``, the same
  image as samples/epoch_NNN.png) and the resolved config (``config``, text); it notes in <run>/tracking.json
  where the run's MLflow run is;
- whoever records an evaluation (``validation.record_eval``: Ray Train's validation task, or rank 0 for a Tune
  trial's inline evaluation): every number the evaluation returned as ``eval/<metric>`` (its floor, ceiling,
  ratio and interval bounds included), at the evaluated epoch. That task is another process: its event file
  sits beside rank 0's and TensorBoard shows both as one run (`tensorboard --logdir runs/`).
The x axis is the epoch everywhere. Tracking never fails training: a tracker that fails says so once and stops.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import sys
import time
import uuid
from typing import Any

from aigc_ray import storage
from aigc_ray.config import ConfigError, ExperimentConfig

STATE = "tracking.json"  # <run>/tracking.json: {"tensorboard": bool, "mlflow": {"tracking_uri", "run_id"} | null}
NOT_LOGGED = {"epoch", "step"}  # the x axis, not a curve
_OPEN: dict[str, RunTracker] = {}  # this process's trackers by run directory (an inline evaluation reuses rank 0's)


def check(cfg: ExperimentConfig) -> None:
    """Before Ray starts: MLflow asked for but not installed is an error, not a run without it."""
    if cfg.track.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"track.mlflow_uri={cfg.track.mlflow_uri}: mlflow is not installed (pip install mlflow)")


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics dict, whatever their names (bools, strings, inf placeholders left out)."""
    return {k: float(v) for k, v in metrics.items() if k not in NOT_LOGGED and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _stopped(what: str, err: BaseException) -> None:
    """Said once per tracker: the caller drops the tracker that failed."""
    # (not print: in a Train worker, Ray's patched print also logs it, and the line shows twice)
    sys.stderr.write(f"warning: {what} tracking stopped for this run: {type(err).__name__}: {err}\n")
    sys.stderr.flush()


def _event_writer(run_dir: str, role: str):
    """A tensorboardX writer of its own event file in run_dir (local, s3:// or gs://, as tensorboardX writes).
    The suffix keeps two processes that open one in the same second from sharing a file name."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=run_dir, filename_suffix=f".{role}.{os.getpid()}.{uuid.uuid4().hex[:6]}",
                         flush_secs=30)


def _png_array(png: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("L" if img.mode in ("L", "I;16") else "RGB"))


class RunTracker:
    """Rank 0's tracker of one Train run: TensorBoard always (unless track.tensorboard is off), MLflow when
    track.mlflow_uri is set."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str):
        self.run_dir, self.tb, self.mlflow, mlflow_state = run_dir, None, None, None
        if cfg.track.tensorboard:
            try:
                self.tb = _event_writer(run_dir, "train")
                self.tb.add_text("config", "\n".join("    " + line for line in cfg.to_yaml().splitlines()), 0)
                self.tb.flush()
            except Exception as err:
                _stopped("TensorBoard", err)
                self.tb = None
        if cfg.track.mlflow_uri:
            try:  # Ray's integration: starts the run on this (rank 0) worker and logs the config as its params
                from ray.air.integrations.mlflow import setup_mlflow

                self.mlflow = setup_mlflow(cfg.to_dict(), tracking_uri=cfg.track.mlflow_uri,
                                           experiment_name=cfg.track.mlflow_experiment, run_name=cfg.run_name,
                                           create_experiment_if_not_exists=True, rank_zero_only=True)
                self.mlflow.log_text(cfg.to_yaml(), "config.yaml")
                mlflow_state = {"tracking_uri": cfg.track.mlflow_uri, "run_id": self.mlflow.active_run().info.run_id}
            except Exception as err:
                _stopped("MLflow", err)
                self.mlflow = None
        storage.write_json(storage.join(run_dir, STATE), {"tensorboard": self.tb is not None, "mlflow": mlflow_state})
        _OPEN[run_dir] = self

    def log_epoch(self, epoch: int, metrics: dict[str, Any], grid_png: bytes | None = None) -> None:
        scalars = {f"train/{k}": v for k, v in numbers(metrics).items()}
        if self.tb is not None:
            try:
                for key, value in scalars.items():
                    self.tb.add_scalar(key, value, epoch)
                if grid_png is not None:
                    grid = _png_array(grid_png)
                    self.tb.add_image("samples", grid, epoch, dataformats="HW" if grid.ndim == 2 else "HWC")
                self.tb.flush()
            except Exception as err:
                _stopped("TensorBoard", err)
                self.tb = None
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(scalars, step=epoch)
                if grid_png is not None:
                    self.mlflow.log_image(_png_array(grid_png), f"samples/epoch_{epoch:03d}.png")
            except Exception as err:
                _stopped("MLflow", err)
                self.mlflow = None

    def log_evaluation(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.tb is not None:
            try:
                _write_evaluation(self.tb, epoch, metrics)
            except Exception as err:
                _stopped("TensorBoard", err)
                self.tb = None
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics({f"eval/{k}": v for k, v in numbers(metrics).items()}, step=epoch)
            except Exception as err:
                _stopped("MLflow", err)
                self.mlflow = None

    def close(self) -> None:
        _OPEN.pop(self.run_dir, None)
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _write_evaluation(writer, epoch: int, metrics: dict[str, Any]) -> None:
    values = numbers(metrics)
    for key, value in values.items():
        writer.add_scalar(f"eval/{key}", value, epoch)
    # a metric with a 95% interval (NAME_lo, NAME_hi) also gets a chart of the value inside its band
    banded = sorted(k for k in values if f"{k}_lo" in values and f"{k}_hi" in values)
    if banded:
        writer.add_custom_scalars({"evaluation (95% interval)": {
            k: ["Margin", [f"eval/{k}", f"eval/{k}_lo", f"eval/{k}_hi"]] for k in banded}})
    writer.flush()


def log_evaluation(run_dir: str, epoch: int, metrics: dict[str, Any]) -> None:
    """An evaluation's numbers into the run's trackers: rank 0's when it runs in this process, else those
    <run>/tracking.json names (a validation task: its own event file, the MLflow run by id). Never raises."""
    tracker = _OPEN.get(run_dir)
    if tracker is not None:
        return tracker.log_evaluation(epoch, metrics)
    try:
        state = storage.read_json(storage.join(run_dir, STATE)) or {}
    except Exception:  # unreadable storage: the evaluation's own records say what it measured
        return
    if state.get("tensorboard"):
        try:
            writer = _event_writer(run_dir, "eval")
            try:
                _write_evaluation(writer, epoch, metrics)
            finally:
                writer.close()
        except Exception as err:
            _stopped("TensorBoard (evaluation)", err)
    mlflow_state = state.get("mlflow")
    if mlflow_state:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            MlflowClient(mlflow_state["tracking_uri"]).log_batch(mlflow_state["run_id"], metrics=[
                Metric(f"eval/{k}", v, now, epoch) for k, v in numbers(metrics).items()])
        except Exception as err:
            _stopped("MLflow (evaluation)", err)
