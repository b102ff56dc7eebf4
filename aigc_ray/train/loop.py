"""The Ray Train loop: data-parallel GAN/VAE training on a Ray cluster.

The Ray calls in the per-worker loop are few and labelled in order:
  [1] prepare model   ray.train.torch.prepare_model (DDP, device placement)
  [2] checkpoint in   ray.train.get_checkpoint (resume after a failure or a rerun)
  [3] dataset shard   ray.train.get_dataset_shard (this worker's share of the Parquet shards)
  [4] report          ray.train.report (metrics every epoch, a checkpoint every K steps)
Everything else is the Ray-free Engine (engine.py), which the benchmark drives directly.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from aigc_ray import storage
from aigc_ray.config import ExperimentConfig
from aigc_ray.data.pipeline import ensure_prepared, load_split, train_dataset
from aigc_ray.data.prepare import read_manifest
from aigc_ray.models.checkpoint import save_checkpoint
from aigc_ray.pipeline import grid_png, to_uint8
from aigc_ray.train.batchnorm import average_batchnorm_stats
from aigc_ray.train.engine import Engine, lr_scale
from aigc_ray.train.resume import check_resumable, load_resume_state
from aigc_ray.train.tracking import RunTracker
from aigc_ray.train.tracking import check as tracking_check
from aigc_ray.train.validation import (
    UNSCORED,
    best_checkpoint,
    finish_history,
    merge_evals,
    read_history,
    record_eval,
)
from aigc_ray.train.validation import validation_config as default_validation_config
from aigc_ray.train.waits import call_within, describe_wait, first_batch_within, placement_labels, record_placement

GRID_SIDE = 8  # the fixed-noise sample grid is 8x8
REPORT_POLL_S = 0.2  # how often Train's controller collects reports (see build_trainer)
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Train V2's placement wait


class ShardBatches:
    """Batches of this worker's shard: streamed through Ray Data the first epoch, then, if
    the shard is small, replayed from memory on the training device with a fresh
    per-epoch permutation (no re-decoding, no host-to-device copies). ``preloaded``: the shard
    already decoded (a dataset small enough to skip Ray Data, see ``fits_in_memory``)."""

    def __init__(self, shard, batch_size: int, device: torch.device, cache_limit_mb: int, seed: int,
                 preloaded: tuple[torch.Tensor, torch.Tensor] | None = None, start_timeout_s: float | None = None,
                 describe_wait=None):
        self.shard, self.batch_size, self.device, self.seed = shard, batch_size, device, seed
        # the first streamed batch must come within start_timeout_s (see waits.first_batch_within)
        self.start_timeout_s, self.describe_wait = start_timeout_s, describe_wait
        self.cache_limit = cache_limit_mb * 2**20
        self.cached = None if preloaded is None else (preloaded[0].to(device), preloaded[1].to(device))
        self.first_images: torch.Tensor | None = None  # uint8 (<= GRID_SIDE^2, C, S, S): the first seen

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._epoch(epoch):
            if self.first_images is None or len(self.first_images) < GRID_SIDE * GRID_SIDE:
                # kept for the sample grid of a family that reconstructs rather than samples
                seen = images if self.first_images is None else torch.cat([self.first_images, images])
                self.first_images = seen[:GRID_SIDE * GRID_SIDE].clone()
            yield images, labels

    def in_memory(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole shard in a fixed order, in batches, once it is held in memory (nothing before:
        a streamed shard cannot be read a second time while an epoch is streaming it)."""
        if self.cached is not None:
            images, labels = self.cached
            yield from zip(images.split(self.batch_size), labels.split(self.batch_size))

    def _epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cached is not None:
            images, labels = self.cached
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed + epoch))
            perm = perm.to(self.device)
            for i in range(len(images) // self.batch_size):
                idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
                yield images[idx], labels[idx]
            return
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0
        stream = self.shard.iter_torch_batches(batch_size=self.batch_size, local_shuffle_buffer_size=2048,
                                               local_shuffle_seed=self.seed + epoch)
        bound, self.start_timeout_s = self.start_timeout_s, None  # only the run's first batch is bounded
        for batch in first_batch_within(stream, bound, self.describe_wait):
            x = batch["image"].to(self.device, non_blocking=True)  # uint8 (n, C, S, S)
            y = batch["label"].to(self.device, non_blocking=True)  # int64 (n,)
            if kept is not None:
                size += x.numel()
                kept = kept + [(x, y)] if size <= self.cache_limit else None
            if len(x) == self.batch_size:  # a short last batch would unbalance DDP workers
                yield x, y
        if kept:
            self.cached = (torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept]))


def fixed_noise(cfg: ExperimentConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same 64 latents (and labels, one class per row) every epoch, for comparable grids."""
    n, m = GRID_SIDE * GRID_SIDE, cfg.model
    z = torch.randn(n, m.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
    labels = (torch.arange(n) // GRID_SIDE % m.num_classes).to(device) if m.num_classes else None
    return z, labels


def _quiet_report_log() -> None:
    """Ray 2.60's Train V2 logs every report at INFO ("Reporting training result ...") under a
    logger named by its file's path, out of LoggingConfig's reach; it would double our one
    line per epoch."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    _quiet_report_log()
    cfg = ExperimentConfig.from_dict(loop_config["experiment"])
    dataset_info, run_dir = loop_config["dataset"], loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config.get("threads") or max(1, loop_config["cpus_per_worker"]))
    device = ray.train.torch.get_device()

    # [1] prepare model: G and D are wrapped for DDP separately (separate optimizers, turns)
    engine = Engine(cfg, device, wrap=lambda m: ray.train.torch.prepare_model(
        m, parallel_strategy_kwargs=_DDP_NO_BUFFER_SYNC))
    record = loop_config.get("placement_record")
    if rank == 0 and record:  # the sweep names (and releases) this run's placement group
        record_placement(record, loop_config["trial"])
    if rank == 0:
        _say(f"fast path on {device}: {engine.fast_path.summary()}; "
             f"shard cached on device after epoch 1 if under {cfg.data.cache_in_memory_mb} MB")

    # [2] checkpoint in: resume where the last reported checkpoint left off
    start_epoch, skip_batches, resumes = 0, 0, []
    # (a Tune PBT segment starts from the Tune checkpoint it was handed, see tuning/driver.py)
    checkpoint = ray.train.get_checkpoint() or loop_config.get("init_checkpoint")
    if checkpoint:
        state, resumed_from = load_resume_state(checkpoint, run_dir)  # the previous one if the latest is corrupt
        engine.load_state_dict(state)
        start_epoch, skip_batches = state["epoch"], state["batch_in_epoch"]
        resumes = [*state.get("resumes", []), engine.step]  # the steps this run restarted from
        if rank == 0:
            _say(f"resuming from {resumed_from} at epoch {start_epoch + 1}, step {engine.step}")

    # [3] dataset shard: this worker's disjoint share of the training rows (a dataset that fits in
    # the in-memory cache is read straight from its Parquet shards: Ray Data's start-up would cost
    # more than the whole decode)
    local_batch = cfg.train.batch_size // world
    preloaded = None
    if loop_config.get("in_memory"):
        images, labels = load_split(dataset_info["prepared"], "train")
        preloaded = images[rank::world], labels[rank::world]
    # the run's start (placement, workers, first batch) has one deadline: a retry after a start
    # timeout fails at once instead of waiting again; a recovery of a run that had trained (it
    # has a checkpoint) gets a fresh bound
    start_timeout_s = loop_config.get("start_timeout_s")
    if start_timeout_s and not checkpoint:
        start_timeout_s = max(loop_config["start_deadline"] - time.time(), 0.01)
    batches = ShardBatches(None if preloaded else ray.train.get_dataset_shard("train"), local_batch, device,
                           cfg.data.cache_in_memory_mb, cfg.train.seed * 1000 + rank, preloaded, start_timeout_s,
                           lambda: f"run {cfg.run_name}: no first batch from Ray Data in time: "
                           + describe_wait({"CPU": 1.0}, "its read and decode tasks (1 CPU each)",
                                           placement_labels(record and os.path.dirname(record))))
    z_fixed, labels_fixed = fixed_noise(cfg, device)
    history = read_history(run_dir) if rank == 0 else []
    tracker = RunTracker(cfg, run_dir) if rank == 0 else None  # TensorBoard (and MLflow), beside metrics.jsonl
    t = cfg.train

    def report(metrics: dict, epoch: int, batch_in_epoch: int, with_checkpoint: bool, validate: bool = False) -> None:
        # [4] report: every worker calls it (a barrier); rank 0 attaches the checkpoint, and
        # asks for it to be evaluated by a separate Ray task (train/validation.py) while we train on
        if with_checkpoint:  # every worker (a collective): refit what the family derives from the data
            engine.fit_to_data(batches.in_memory)
        if rank != 0 or not with_checkpoint:
            ray.train.report(metrics)
            return
        if loop_config.get("unscored_fid"):  # until evaluated, a checkpoint ranks last by fid, not first
            metrics = {"fid": UNSCORED} | metrics
        with tempfile.TemporaryDirectory() as tmp:
            state = engine.state_dict() | {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "resumes": resumes}
            save_checkpoint(tmp, experiment=cfg, served_state=engine.served_module().state_dict(),
                            step=engine.step, epoch=epoch, ema=engine.ema is not None, dataset=dataset_info,
                            train_state=state)
            samples = to_uint8(_grid_images(engine, cfg, z_fixed, labels_fixed, batches))
            Path(tmp, "samples.png").write_bytes(grid_png(samples, nrow=GRID_SIDE))
            if validate and loop_config.get("inline_eval"):
                # scored here, before the report (the other workers wait at its barrier): a Tune
                # scheduler then decides on this epoch's FID before the next epoch trains
                from aigc_ray.eval.quality import flat_metrics, score_checkpoint

                card = score_checkpoint(tmp, cfg.eval.num_samples, cfg.eval.seed, own_checkpoint=True)
                storage.write_json(str(Path(tmp, "card.json")), card)
                metrics = metrics | flat_metrics(card)
                record_eval(run_dir, card, flat_metrics(card), f"epoch {epoch}")
                validate = False
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             validation=validate and bool(loop_config.get("validate")))

    if start_epoch >= t.epochs:  # resumed a finished run: repeat its last report, which a Tune
        # trial interrupted after Train had registered it may never have received, with the
        # checkpoint it came with (the one we resumed from), or Tune has a best FID but no
        # checkpoint to export for it
        if rank == 0 and history:
            with checkpoint.as_directory() as ckpt_dir:
                ray.train.report(merge_evals(run_dir, history)[-1], checkpoint=Checkpoint.from_directory(ckpt_dir))
        else:
            ray.train.report({})
    started = time.perf_counter()
    recent_s: list[float] = []  # the last epochs' times, for the ETA in the epoch line
    for epoch in range(start_epoch, t.epochs):
        sums: dict[str, torch.Tensor | float] = {}
        # epoch_time_s runs from the end of the previous epoch's steps, so it includes that
        # epoch's per-epoch costs (artifacts, report barrier, checkpoint upload)
        count, images_seen = 0, 0
        done = False
        engine.set_progress(epoch / loop_config["schedule_epochs"])
        engine.set_lr_scale(lr_scale(engine.progress, t.lr_decay_start))
        for i, (x, y) in enumerate(batches.epoch(epoch)):
            if epoch == start_epoch and i < skip_batches:
                continue  # already trained on before the checkpoint we resumed from
            out = engine.train_batch(x, y)
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value  # tensors: summed on device, no sync
            count += 1
            images_seen += len(x) * world
            done = bool(t.max_steps and engine.g_steps >= t.max_steps)
            if engine.step % t.checkpoint_every == 0 and not done:
                average_batchnorm_stats(engine.G, engine.D, engine.ema)  # (a collective: every worker)
                report(_means(sums, count) | {"epoch": epoch + i / 1e6, "step": engine.step}, epoch, i + 1, True)
            if done:
                break
        elapsed, started = time.perf_counter() - started, time.perf_counter()
        # every worker, before rank 0 draws the grid and checkpoints: BatchNorm statistics of all shards
        average_batchnorm_stats(engine.G, engine.D, engine.ema)
        last = done or epoch + 1 == t.epochs
        metrics = _means(sums, count) | {"epoch": epoch + 1, "step": engine.step,
                                         "images_per_s": images_seen / max(elapsed, 1e-9), "epoch_time_s": elapsed}
        if rank == 0:
            history.append(metrics)
            if loop_config.get("validate"):
                merge_evals(run_dir, history)  # FIDs of epochs evaluated so far, into metrics.jsonl
            _write_epoch_artifacts(run_dir, history, engine, cfg, z_fixed, labels_fixed, batches, epoch, last, tracker)
            recent_s = [*recent_s[-2:], elapsed]
            _say(_epoch_line(metrics, t.epochs, 0.0 if last else sum(recent_s) / len(recent_s) * (t.epochs - epoch - 1)))
        every = cfg.eval.every_epochs
        evaluate = bool(loop_config.get("validate")) and (last or bool(every and (epoch + 1) % every == 0))
        report(metrics, epoch + 1, 0, with_checkpoint=last or evaluate or (epoch + 1) % t.checkpoint_every_epochs == 0,
               validate=evaluate)
        if done:
            break
    if tracker is not None:
        tracker.close()


def _say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver. (Train V2
    patches print() to also log, which would show each line twice.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# BatchNorm statistics are not broadcast on every forward (that would add a broadcast to each of
# D's three forward passes per step); they are averaged over the workers before each checkpoint
# and sample grid instead (aigc_ray/train/batchnorm.py).
_DDP_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})


def _means(sums: dict[str, torch.Tensor | float], count: int) -> dict[str, float]:
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def _grid_images(engine: Engine, cfg: ExperimentConfig, z, labels, batches: ShardBatches) -> torch.Tensor:
    """Samples of the fixed latents, or (a family that cannot generate) reconstructions of the
    first training images this worker saw."""
    real = None if batches.first_images is None else batches.first_images.float() / 127.5 - 1
    return engine.sample_grid(z, labels, real)


def _write_epoch_artifacts(run_dir, history, engine, cfg, z, labels, batches, epoch: int, last: bool,
                           tracker: RunTracker | None = None) -> None:
    """Rank 0 only: metrics.jsonl (rewritten whole, so a resumed run keeps earlier epochs), the
    fixed-noise sample grid for this epoch, and the same epoch in TensorBoard / MLflow (tracking.py)."""
    lines = "".join(json.dumps(h) + "\n" for h in history)
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), lines.encode())
    png = None
    if (epoch + 1) % cfg.train.sample_every == 0 or last:
        png = grid_png(to_uint8(_grid_images(engine, cfg, z, labels, batches)), nrow=GRID_SIDE)
        storage.write_bytes(storage.join(run_dir, "samples", f"epoch_{epoch + 1:03d}.png"), png)
    if tracker is not None:
        tracker.log_epoch(epoch + 1, history[-1], png)


def _epoch_line(m: dict, epochs: int, eta_s: float = 0.0) -> str:
    """One line per epoch; `eta_s`: the time the remaining epochs will take at the last epochs' pace."""
    skip = {"epoch", "step", "images_per_s", "epoch_time_s"}
    parts = " ".join(f"{k}={v:.4f}" for k, v in m.items() if k not in skip)
    left = math.ceil(eta_s)
    eta = f" eta {left // 60}m{left % 60:02d}s" if left > 0 else ""
    return (f"epoch {m['epoch']:>3}/{epochs} step {m['step']:>6} {parts} "
            f"{m['images_per_s']:.0f} img/s {m['epoch_time_s']:.1f}s{eta}")


# --- driver side -------------------------------------------------------------------------

@dataclass
class TrainingOutcome:
    checkpoint: str  # path or URI of the checkpoint `aigc-ray train` names at the end: the best by FID
    run_dir: str
    metrics: dict  # the latest report's
    latest: str = ""  # the last checkpoint (the same as checkpoint when eval is off)
    best_metrics: dict | None = None  # the named checkpoint's metrics, fid included, when evaluated


def init_ray(address: str | None = None, workers: int = 1) -> None:
    """Join RAY_ADDRESS / --address when given (ray job submit sets it), else start a
    local Ray that declares the machine's cores (more only when asked for more workers than
    there are cores beside one for Ray Data's reads and the evaluation task)."""
    if ray.is_initialized():
        return
    from aigc_ray import console

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **console.ray_init_kwargs())
    else:
        # One machine: no node can be drained, so Train V2's PreemptionWatcher (an actor per run
        # that polls for draining nodes) has nothing to watch, and its shutdown prints a
        # core_worker error line that reads like a failure. Ray passes the driver's value on to
        # the controller; a value the user sets wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        global _OWN_LOCAL_CORES
        _OWN_LOCAL_CORES = os.cpu_count() or 1
        ray.init(num_cpus=local_ray_cpus(_OWN_LOCAL_CORES, workers), **console.ray_init_kwargs())


_OWN_LOCAL_CORES: int | None = None  # set when this process started the local Ray it trains on


def local_ray_cpus(cores: int, workers: int) -> int:
    """CPUs a local Ray declares: the machine's, or workers + 1 where that is more (each worker
    reserves one CPU, and Ray Data's reads and the evaluation task need one beside them)."""
    return max(cores, workers + 1)


def torch_threads(cfg: ExperimentConfig, reserved: int, own_local_cores: int | None) -> int:
    """Intra-op threads per worker. A CPU count set in the config (a sweep's trials share the
    machine) is kept; on a local Ray this process started, the workers share the machine's
    cores, including the one Ray keeps for data reads and the evaluation task, which mostly
    wait (the evaluation runs at idle priority); elsewhere, what Ray reserved."""
    if cfg.train.cpus_per_worker or not own_local_cores:
        return max(1, reserved)
    return max(1, reserved, own_local_cores // cfg.train.workers)


def cpus_per_worker(cfg: ExperimentConfig) -> int:
    if cfg.train.cpus_per_worker:
        return cfg.train.cpus_per_worker
    total = int(ray.cluster_resources().get("CPU", 1)) - 1  # one left for Ray Data
    return max(1, total // cfg.train.workers)


def fits_in_memory(cfg: ExperimentConfig, manifest: dict) -> bool:
    """A worker's decoded share of the training split fits in its shard cache
    (data.cache_in_memory_mb): it then reads the Parquet shards itself instead of through Ray Data.
    Measured on the default run (1,437 digits, 16x16): Ray Data's first pass took 11 s (127 img/s)."""
    m = cfg.model
    decoded = manifest["counts"]["train"] * m.channels * m.image_size ** 2 / cfg.train.workers
    return 0 < decoded <= cfg.data.cache_in_memory_mb * 2**20


def build_trainer(cfg: ExperimentConfig, *, callbacks=(), validation_config=None,
                  checkpoint_score: str | None = None, init_checkpoint: Checkpoint | None = None,
                  inline_eval: bool = False, start_timeout_s: float | None = None,
                  trial: str | None = None, placement_record: str | None = None,
                  schedule_epochs: int | None = None) -> tuple[TorchTrainer, str]:
    """The run's TorchTrainer and run directory. ``inline_eval``: evaluated epochs are scored on
    rank 0 before their report (Tune ASHA/FIFO trials) instead of by a separate validation task.
    ``start_timeout_s``: the run fails (``waits.StartTimeout``, or Train's
    WorkerGroupStartupTimeoutError) when its workers cannot be placed, or its data gives no first
    batch, within that many seconds, instead of waiting for ever. ``trial``, ``placement_record``: the
    Tune trial this run belongs to, and where its rank 0 records its workers' placement group.
    ``schedule_epochs``: the length the learning-rate schedule (train.lr_decay_start) spans, when the run
    is one segment of a longer training (a PBT trial's); default train.epochs."""
    # opening the dataset and placing the workers are each bounded by start_timeout_s; the workers'
    # first batch must come within start_timeout_s of this moment (loop_config's start_deadline)
    started = time.time()
    prepared = ensure_prepared(cfg.data, cfg.train.seed)
    manifest = read_manifest(prepared)
    storage_path = storage.resolve(cfg.train.storage_path or cfg.train.out)
    run_dir = storage.join(storage_path, cfg.run_name)
    check_resumable(run_dir, cfg)  # a rerun of --name R that changes the weights' shapes: an error, not a crash loop
    dataset_info = {"prepared": prepared, "content_hash": manifest["content_hash"],
                    "num_classes": manifest["num_classes"], "class_names": manifest["class_names"],
                    "source": manifest["source"]}
    if cfg.model.num_classes and cfg.model.num_classes != manifest["num_classes"]:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but {cfg.data.dataset} has "
                         f"{manifest['num_classes']} classes")
    cpus = cpus_per_worker(cfg)
    in_memory = fits_in_memory(cfg, manifest)
    # Train V2's controller takes one report per poll of the workers (each worker's report
    # queue holds one) and polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a
    # worker whose epochs are shorter than that waits in every report. The driver's value is
    # propagated to the controller; one set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    if start_timeout_s:
        # read by Train when it waits for the workers' placement group; propagated to the
        # controller from this process (a Tune trial's own, so per trial)
        os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{start_timeout_s:g}"
    own_validation = validation_config is None and cfg.eval.enabled and not inline_eval
    if own_validation:  # score checkpoints by domain FID; keep the best ones and the latest
        validation_config, checkpoint_score = default_validation_config(cfg, run_dir), "fid"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "dataset": dataset_info, "run_dir": run_dir,
                           "cpus_per_worker": cpus, "threads": torch_threads(cfg, cpus, _OWN_LOCAL_CORES),
                           "init_checkpoint": init_checkpoint,
                           "validate": validation_config is not None or inline_eval,
                           "inline_eval": inline_eval, "unscored_fid": own_validation, "in_memory": in_memory,
                           "start_timeout_s": start_timeout_s, "trial": trial,
                           "start_deadline": started + (start_timeout_s or 0),
                           "placement_record": placement_record,
                           "schedule_epochs": schedule_epochs or cfg.train.epochs},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path,
            # with a start bound, a worker group that could not be placed in time is final (by
            # default Train retries it for ever, each retry another silent wait)
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         **({"controller_failure_limit": 0} if start_timeout_s else {})),
            checkpoint_config=CheckpointConfig(
                # with a score: the best keep_checkpoints by it, plus the latest (Ray never deletes that)
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=checkpoint_score, checkpoint_score_order="min"),
            callbacks=list(callbacks), logging_config=LoggingConfig(log_level="WARNING")),
        datasets={} if in_memory else {"train": call_within(
            lambda: train_dataset(prepared), start_timeout_s,
            lambda: f"run {cfg.run_name}: its Parquet dataset could not be opened in time: " + describe_wait(
                {"CPU": 1.0}, "Ray Data's file sampling tasks (1 CPU each)",
                placement_labels(placement_record and os.path.dirname(placement_record))))},
        validation_config=validation_config,
    )
    return trainer, run_dir


def run_training(cfg: ExperimentConfig, *, address: str | None = None) -> TrainingOutcome:
    ensure_prepared(cfg.data, cfg.train.seed)  # a bad dataset fails here, before Ray starts
    tracking_check(cfg)  # so does track.mlflow_uri without mlflow installed
    init_ray(address, cfg.train.workers)
    trainer, run_dir = build_trainer(cfg)
    _say_what_runs(cfg, trainer)
    result = trainer.fit()
    if result.error:
        raise result.error
    final = result.checkpoint
    if final is None:
        raise RuntimeError(f"training run {cfg.run_name} reported no checkpoint")
    storage.write_bytes(storage.join(run_dir, "config.yaml"), cfg.to_yaml().encode())
    finish_history(run_dir)  # evaluated epochs' FIDs into metrics.jsonl, metrics.png
    # GAN quality often worsens late: name the checkpoint with the lowest FID, not the last one
    best = best_checkpoint(result) if cfg.eval.enabled else None
    if cfg.eval.enabled and best is None:
        print(f"warning: no checkpoint of {cfg.run_name} was evaluated; naming the latest", file=sys.stderr)
    chosen, best_metrics = best or (final, {})

    return TrainingOutcome(checkpoint=storage.in_scheme_of(run_dir, chosen.path), run_dir=run_dir,
                           metrics=dict(result.metrics or {}),
                           latest=storage.in_scheme_of(run_dir, final.path), best_metrics=dict(best_metrics))


def _say_what_runs(cfg: ExperimentConfig, trainer: TorchTrainer) -> None:
    """The run's first line of its own: how many workers on which devices, and on what data."""
    prepared = trainer.train_loop_config["dataset"]["prepared"]
    counts = read_manifest(prepared)["counts"]
    cpus = trainer.train_loop_config["cpus_per_worker"]
    devices = "1 GPU" if cfg.train.use_gpu else f"{cpus} CPU{'s' if cpus > 1 else ''}"
    print(f"training {cfg.run_name}: {cfg.train.workers} worker{'s' if cfg.train.workers > 1 else ''} x {devices}, "
          f"{cfg.data.dataset} ({counts['train']} train / {counts['test']} test images, {prepared})",
          file=sys.stderr, flush=True)


def main_print(outcome: TrainingOutcome) -> None:
    print(f"run directory: {outcome.run_dir}", file=sys.stderr)
    m = outcome.best_metrics or {}
    if "fid" in m:
        print(f"best checkpoint by domain FID: fid={m['fid']:.4g} (floor {m['fid_floor']:.4g}, "
              f"{m['fid'] / max(m['fid_floor'], 1e-12):.2f}x) at epoch {m.get('epoch')}; "
              f"card.json inside; latest: {outcome.latest}", file=sys.stderr)
    print(outcome.checkpoint)  # the last line is the checkpoint's path, for scripts


__all__ = ["run_training", "build_trainer", "init_ray", "train_loop_per_worker", "TrainingOutcome"]
