"""The Ray Train loop for language models: data-parallel (DDP) next-byte training on a Ray cluster.

The Ray calls in the per-worker loop, in order:
  [1] prepare model   ray.train.torch.prepare_model (DDP, device placement)
  [2] checkpoint in   ray.train.get_checkpoint (resume after a failure or a rerun of the same --name)
  [3] dataset shard   each worker draws its windows from the prepared training tokens with its own
                      seed (rank-dependent), so workers see different data; a corpus of a few MB is read
                      whole (memory-mapped) rather than through Ray Data
  [4] report          ray.train.report: every epoch, with a checkpoint scored by validation bits per byte
The run layout is the image runs': runs/<run>/{checkpoint_*/, metrics.jsonl, metrics.png}.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from aigc_ray import storage
from aigc_ray.data.text import ensure_prepared_text, load_tokens, read_text_manifest
from aigc_ray.models.text_checkpoint import TRAIN_STATE, save_text_checkpoint
from aigc_ray.models.text_registry import build_text_model
from aigc_ray.text_config import TextExperimentConfig
from aigc_ray.text_pipeline import SamplingSettings, TextPipeline
from aigc_ray.text_quality import baselines, model_block_bits, text_card


def lr_at(step: int, total: int, t, trained_s: float = 0.0) -> float:
    """Linear warm-up to train.lr, then cosine to train.lr / 10 at the end of the run: its last step, or with
    train.max_time_s its time budget, whichever comes first (so a time-bound run also ends its schedule)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    if t.max_time_s:
        frac = max(frac, trained_s / t.max_time_s)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n and "emb" not in n
             and "pos" not in n]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2))


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def quality_card(model, cfg: TextExperimentConfig, val: np.ndarray, device, floor: dict, manifest: dict) -> dict:
    """Validation bits/byte with its interval, the baselines beside it, and a sample."""
    m = cfg.model
    per_block = model_block_bits(model, val, m.block_size, device, cfg.eval.max_blocks)
    e = cfg.eval
    settings = SamplingSettings(max_new_tokens=e.sample_tokens, temperature=0.8, top_k=0, seed=e.seed)
    pipe = TextPipeline(model, {"model": cfg.to_dict()["model"], "vocab": {"kind": m.vocab, "size": 256}}, "", device)
    text = pipe.complete(e.sample_prompt, settings)
    model.train()
    return text_card(per_block, floor, dataset_hash=manifest["content_hash"], block_size=m.block_size,
                     max_blocks=e.max_blocks, sample={"prompt": e.sample_prompt, "text": text, "seed": e.seed,
                                                      "temperature": 0.8, "max_new_tokens": e.sample_tokens})


def text_train_loop_per_worker(loop_config: dict) -> None:
    from aigc_ray.train.loop import _quiet_report_log

    _quiet_report_log()  # Train V2's INFO line per report would double the epoch line
    cfg = TextExperimentConfig.from_dict(loop_config["experiment"])
    t, m = cfg.train, cfg.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)
    net = build_text_model(m)
    if t.compile:
        net = torch.compile(net)
    model = ray.train.torch.prepare_model(net)  # [1] prepare model (DDP when world > 1)
    raw = model.module if hasattr(model, "module") else model
    raw = getattr(raw, "_orig_mod", raw)  # the plain module under torch.compile: what is checkpointed
    opt = _optimizer(raw, t)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.precision == "fp16")
    total = min(t.epochs * t.steps_per_epoch, t.max_steps or 10**12)
    step, start_epoch, trained_s = 0, 0, 0.0
    checkpoint = ray.train.get_checkpoint()  # [2] checkpoint in
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, TRAIN_STATE), map_location="cpu", weights_only=True)
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, start_epoch, trained_s = state["step"], state["epoch"], state.get("trained_s", 0.0)
        if rank == 0:
            _say(f"resuming from epoch {start_epoch} at step {step}")
    prepared = loop_config["prepared"]
    train = torch.from_numpy(np.array(load_tokens(prepared, "train"), dtype=np.int64))  # [3] dataset shard
    val = np.asarray(load_tokens(prepared, "validation"))
    manifest = read_text_manifest(prepared)
    local_batch, T = t.batch_size // world, m.block_size
    # a worker's windows: its own stream, continued after a resume at the step it left off
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank * 7919 + step)
    floor = loop_config["baselines"]
    run_dir = loop_config["run_dir"]
    history = storage.read_jsonl(storage.join(run_dir, "metrics.jsonl")) if rank == 0 else []
    history = [h for h in history if h.get("epoch", 0) <= start_epoch]
    arange = torch.arange(T + 1)
    done = step >= total
    for epoch in range(start_epoch, t.epochs):
        if done:
            break
        started, losses = time.perf_counter(), []
        for _ in range(t.steps_per_epoch):
            idx = torch.randint(0, len(train) - T - 1, (local_batch,), generator=gen)[:, None] + arange
            windows = train[idx].to(device, non_blocking=True)  # (b, T + 1)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, t, trained_s + time.perf_counter() - started)
            with _autocast(device, t.precision):
                logits, _ = model(windows[:, :-1])  # (b, T, 256)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
            step += 1
            over = step >= total or bool(t.max_time_s and trained_s + time.perf_counter() - started >= t.max_time_s)
            if world > 1 and t.max_time_s:  # every worker stops at the same step (DDP), rank 0's clock decides
                flag = torch.tensor([float(over)], device=device)
                torch.distributed.broadcast(flag, 0)
                over = bool(flag.item())
            if over:
                done = True
                break
        elapsed = time.perf_counter() - started
        trained_s += elapsed
        train_bpb = float(torch.stack(losses).mean()) / math.log(2)
        metrics = {"epoch": epoch + 1, "step": step, "train_bpb": train_bpb, "lr": lr_at(step - 1, total, t, trained_s),
                   "tokens_per_s": len(losses) * t.batch_size * T / max(elapsed, 1e-9), "epoch_time_s": elapsed,
                   "trained_s": trained_s}
        if rank != 0:
            ray.train.report(metrics)  # [4] report (a barrier for every worker)
            continue
        card = quality_card(raw, cfg, val, device, floor, manifest)
        metrics |= card["metrics"]
        history.append(metrics)
        lines = "".join(json.dumps(h) + "\n" for h in history)
        storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), lines.encode())
        storage.write_bytes(storage.join(run_dir, "metrics.png"), plot_text_history(history, floor, cfg.run_name))
        _say(f"epoch {epoch + 1:>3}/{t.epochs} step {step:>6} train_bpb={train_bpb:.3f} "
             f"val_bpb={metrics['val_bpb']:.3f} [{metrics['val_bpb_lo']:.3f}, {metrics['val_bpb_hi']:.3f}] "
             f"(bigram {floor['bigram']['mean']:.3f}) {metrics['tokens_per_s']:.0f} tok/s {elapsed:.1f}s")
        with tempfile.TemporaryDirectory() as tmp:
            save_text_checkpoint(tmp, experiment=cfg, state=raw.state_dict(), step=step, epoch=epoch + 1,
                                 dataset=loop_config["dataset"], card=card,
                                 train_state={"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                              "epoch": epoch + 1, "trained_s": trained_s})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))  # [4] report


def plot_text_history(history: list[dict], floor: dict, title: str) -> bytes:
    """metrics.png: train and validation bits per byte (with the interval) per epoch, the baselines as lines."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_bpb"] for h in history], label="train")
    ax.plot(epochs, [h["val_bpb"] for h in history], label="validation")
    ax.fill_between(epochs, [h["val_bpb_lo"] for h in history], [h["val_bpb_hi"] for h in history], alpha=0.3)
    for name, b in floor.items():
        ax.axhline(b["mean"], linestyle="--", linewidth=1, label=name, color="grey" if name == "unigram" else "black")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class TextTrainingOutcome:
    checkpoint: str  # the best checkpoint by validation bits per byte
    run_dir: str
    metrics: dict  # the best checkpoint's


def run_text_training(cfg: TextExperimentConfig, *, address: str | None = None) -> TextTrainingOutcome:
    from aigc_ray.train.loop import _OWN_LOCAL_CORES, init_ray

    prepared = ensure_prepared_text(cfg.data)  # a bad or empty corpus fails here, before Ray starts
    manifest = read_text_manifest(prepared)
    floor = baselines(np.asarray(load_tokens(prepared, "train")), np.asarray(load_tokens(prepared, "validation")),
                      cfg.model.block_size, cfg.eval.max_blocks)
    init_ray(address, cfg.train.workers)
    trainer, run_dir = build_text_trainer(cfg, prepared, manifest, floor, _OWN_LOCAL_CORES)
    print(f"training {cfg.run_name}: {cfg.train.workers} worker(s), {cfg.model.family} on {cfg.data.dataset} "
          f"({manifest['counts']['train']:,} train / {manifest['counts']['validation']:,} validation bytes; "
          f"unigram {floor['unigram']['mean']:.3f}, bigram {floor['bigram']['mean']:.3f} bits/byte)",
          file=sys.stderr, flush=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    best = result.get_best_checkpoint("val_bpb", "min") if hasattr(result, "get_best_checkpoint") else None
    chosen = best or result.checkpoint
    if chosen is None:
        raise RuntimeError(f"training run {cfg.run_name} reported no checkpoint")
    storage.write_bytes(storage.join(run_dir, "config.yaml"), cfg.to_yaml().encode())
    metrics = next((m for c, m in result.best_checkpoints if c.path == chosen.path), dict(result.metrics or {}))
    return TextTrainingOutcome(checkpoint=chosen.path, run_dir=run_dir, metrics=dict(metrics))


def build_text_trainer(cfg: TextExperimentConfig, prepared: str, manifest: dict, floor: dict,
                       own_local_cores: int | None = None, callbacks=()) -> tuple[TorchTrainer, str]:
    t = cfg.train
    storage_path = storage.resolve(t.storage_path or t.out)
    run_dir = storage.join(storage_path, cfg.run_name)
    cpus = t.cpus_per_worker or max(1, (int(ray.cluster_resources().get("CPU", 1))) // t.workers)
    threads = cpus if t.cpus_per_worker or not own_local_cores else max(1, own_local_cores // t.workers)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    trainer = TorchTrainer(
        text_train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "prepared": prepared, "run_dir": run_dir, "threads": threads,
                           "baselines": floor,
                           "dataset": {"prepared": prepared, "content_hash": manifest["content_hash"],
                                       "source": manifest["source"]}},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                                checkpoint_score_attribute="val_bpb",
                                                                checkpoint_score_order="min"),
                             callbacks=list(callbacks), logging_config=LoggingConfig(log_level="WARNING")))
    return trainer, run_dir


def main_print(outcome: TextTrainingOutcome) -> None:
    m = outcome.metrics
    print(f"run directory: {outcome.run_dir}", file=sys.stderr)
    if "val_bpb" in m:
        print(f"best checkpoint by validation bits/byte: {m['val_bpb']:.4f} [{m['val_bpb_lo']:.4f}, "
              f"{m['val_bpb_hi']:.4f}] at epoch {m.get('epoch')}; card.json and samples.txt inside", file=sys.stderr)
    print(outcome.checkpoint)
