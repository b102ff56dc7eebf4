"""Tune trial functions: each trial is a Ray Train run (Train V2: Tune drives Train from a
driver function, ``Tuner(driver_fn)``).

- ``run_trial`` (ASHA, FIFO): one TorchTrainer per trial, named after the trial id, so a
  restored sweep finds the trial's Train run and resumes it from its last checkpoint. Train's
  ``TuneReportCallback`` forwards each epoch's report to Tune; the FID arrives from the
  validation function (tuning/evaluation.py), with the epoch it scores.
- ``run_pbt_trial`` (PBT): training in segments of ``perturbation_interval`` epochs, each a
  fresh TorchTrainer started from ``ray.tune.get_checkpoint()`` with the trial's *current*
  config, so mutated hyperparameters are in force from the first start and after every
  exploit (the engine takes the learning rate and betas from the config, not from the
  optimizer state it loads). The segment's last checkpoint is reported to Tune, which PBT
  clones.
"""

from __future__ import annotations

import math
import shutil
import uuid
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from aigc_ray import storage
from aigc_ray.config import ExperimentConfig
from aigc_ray.train.waits import StartTimeout, describe_wait
from aigc_ray.tuning import evaluation, watch

TRAIN_RUNS = "train"  # Train runs live under <storage>/<sweep>/train/<trial id>


def trial_config(sweep: dict[str, Any], config: dict[str, Any], name: str, epochs: int | None = None) -> ExperimentConfig:
    """The trial's ExperimentConfig: base + fixed overrides + its searched values (config["space"])."""
    cfg = ExperimentConfig.from_dict(sweep["base"])
    overrides = dict(config["space"]) | {"train.name": name, "train.storage_path": sweep["train_storage"],
                                         "train.out": sweep["out"]}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    return cfg.with_overrides(overrides)


class ForwardToTune(TuneReportCallback):
    """Train's TuneReportCallback, minus the placeholder FID (inf) that a checkpoint carries
    until its evaluation finishes: a scheduler must only ever see real scores."""

    def after_report(self, run_context, metrics, checkpoint):
        first = {k: v for k, v in metrics[0].items() if not (isinstance(v, float) and math.isinf(v))}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def _build(cfg: ExperimentConfig, forward: bool, sweep: dict[str, Any], trial_id: str, **kwargs):
    """The trial's TorchTrainer, with the loop's FID validation adapted to Tune. Passing the
    validation config in (rather than letting build_trainer add its own) also leaves out the
    fid=inf placeholder on unscored checkpoints: Train's snapshot stores it as null, and a
    resumed run then fails to rank them. The sweep keeps every evaluated checkpoint instead."""
    try:
        return _build_trainer(cfg, forward, sweep, trial_id, **kwargs)
    except StartTimeout as err:  # its Parquet dataset could not be opened (waits.call_within)
        raise StartTimeout(_could_not_start(trial_id, sweep) + str(err)) from None


def _could_not_start(trial_id: str, sweep: dict[str, Any]) -> str:
    return f"trial {trial_id} could not start within {sweep.get('start_timeout_s'):g}s (start_timeout_s): "


def _build_trainer(cfg: ExperimentConfig, forward: bool, sweep: dict[str, Any], trial_id: str, **kwargs):
    from aigc_ray.train.loop import build_trainer
    from aigc_ray.train.validation import validation_config

    kwargs |= {"start_timeout_s": sweep.get("start_timeout_s"), "trial": trial_id,
               "placement_record": watch.placement_record(sweep["train_storage"], trial_id)}
    if forward and cfg.eval.enabled:
        # ASHA/FIFO: score evaluated epochs inline, so each FID reaches Tune with its epoch's
        # report and ASHA stops a trial at its rung (an asynchronous score arrived epochs late,
        # after the trial had trained past the rung, or to its end)
        return build_trainer(cfg, inline_eval=True, **kwargs)
    validation = None
    if cfg.eval.enabled:
        run_dir = storage.join(storage.resolve(cfg.train.storage_path or cfg.train.out), cfg.run_name)
        validation = evaluation.for_tune(validation_config(cfg, run_dir))
    return build_trainer(cfg, validation_config=validation, **kwargs)


def _fit(trainer, sweep: dict[str, Any], trial_id: str):
    """trainer.fit(), with a start that ran out of time (workers that could not be placed, or
    data that gave no first batch) raised as ``StartTimeout`` naming what it waited for."""
    try:
        return trainer.fit()
    except Exception as err:
        if type(getattr(err, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            scaling = trainer.scaling_config
            per_worker = dict(scaling.resources_per_worker or {"CPU": 1}) | ({"GPU": 1} if scaling.use_gpu else {})
            need = {k: v * scaling.num_workers for k, v in per_worker.items()}
            raise StartTimeout(_could_not_start(trial_id, sweep) + describe_wait(
                need, f"its {scaling.num_workers} worker(s)' placement group", watch.labels(sweep["train_storage"]))) from None
        for failure in (getattr(err, "worker_failures", None) or {}).values():
            cause = failure if isinstance(failure, StartTimeout) else getattr(failure, "cause", None)
            text = str(cause) if isinstance(cause, StartTimeout) else _after("StartTimeout", str(failure))
            if text:  # raised in a worker: waits.first_batch_within
                raise StartTimeout(_could_not_start(trial_id, sweep) + text.strip().splitlines()[0]) from None
        raise


def _after(name: str, text: str) -> str:
    """The message after the last "<...>name: " in a traceback's text, or ""."""
    return text[text.rindex(name) + len(name):].lstrip(": ") if name in text else ""


def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """ASHA / FIFO trial: one Train run, reports forwarded to Tune as they happen."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(sweep, config, name=trial_id)
    trainer, _ = _build(cfg, forward=True, sweep=sweep, trial_id=trial_id, callbacks=[ForwardToTune()])
    _fit(trainer, sweep, trial_id)
    # fit() can return while the last report (with its FID) still waits on the queue to Tune
    # (ForwardToTune puts it there); the trial's session forwards queued items only while this
    # function runs, so wait until it has taken it, or the last epoch reads as unscored
    evaluation.wait_until_forwarded()


def run_pbt_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """PBT trial: segments of perturbation_interval epochs from the current Tune checkpoint."""
    from aigc_ray.models.checkpoint import load_train_state, read_meta

    trial_id = ray.tune.get_context().get_trial_id()
    interval, budget, metric = sweep["perturbation_interval"], sweep["epochs"], sweep["metric"]
    start = ray.tune.get_checkpoint()
    epoch = 0
    if start is not None:
        with start.as_directory() as directory:
            epoch = int(read_meta(directory)["epoch"])
    while epoch < budget:
        stop = min(epoch + interval, budget)
        # a fresh Train run per segment: its name must not find a run left by a segment this
        # trial started before an exploit replaced its weights
        cfg = trial_config(sweep, config, name=f"{trial_id}-e{epoch:04d}-{uuid.uuid4().hex[:6]}", epochs=stop)
        trainer, run_dir = _build(cfg, forward=False, sweep=sweep, trial_id=trial_id, init_checkpoint=start,
                                  schedule_epochs=budget)  # the learning-rate schedule spans the whole trial
        result = _fit(trainer, sweep, trial_id)
        last = result.checkpoint
        scored = dict(result.metrics or {})
        for checkpoint, metrics in result.best_checkpoints or []:
            if checkpoint.path == last.path:
                scored |= metrics  # the validation scores merged into the last checkpoint's metrics
        value = scored.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RuntimeError(f"PBT segment {epoch}->{stop} of trial {trial_id} has no {metric!r} (got {value!r})")
        with last.as_directory() as directory:
            report = {k: v for k, v in scored.items() if isinstance(v, (int, float))} | {"epoch": stop}
            # the learning rates the optimizers were at, from the checkpoint's own state: what
            # the segment really trained with (mutations included), shown beside the config
            state = load_train_state(directory)
            # (float(): a tensor where the step ran as a CUDA graph; with train.lr_decay_start < 1, the
            # segment's last epoch's scaled rate)
            report["trained_lr_g"] = float(state["opt_g"]["param_groups"][0]["lr"])
            if state.get("opt_d"):
                report["trained_lr_d"] = float(state["opt_d"]["param_groups"][0]["lr"])
            ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(directory))
        start = ray.tune.get_checkpoint()  # Tune's copy: the segment's own run can go
        if not storage.is_uri(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        epoch = stop
