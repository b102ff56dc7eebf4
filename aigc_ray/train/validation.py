"""Quality evaluation during training, off the workers' critical path.

Ray Train V2 runs ``validate`` as its own Ray task on each checkpoint a worker reports with
``validation=True`` (every ``eval.every_epochs`` epochs and at the end); the workers train on
meanwhile. Its returned metrics (``fid``, ``fid_floor``, ``fid_ratio``, ``kid``, ...) are merged
into that checkpoint's metrics, where ``CheckpointConfig(checkpoint_score_attribute="fid",
checkpoint_score_order="min")`` ranks them: Ray keeps the best checkpoints by FID and the
latest. The task also writes the quality card into the checkpoint, records the numbers under
``<run>/evals/`` (merged into metrics.jsonl by rank 0 and by the driver at the end) and
redraws ``<run>/metrics.png``.
"""

from __future__ import annotations

import json
import math

import pyarrow.fs as pafs
import ray.train

from aigc_ray import storage
from aigc_ray.config import ExperimentConfig
from aigc_ray.train import tracking
from aigc_ray.train.background import run_in_background

EVALS = "evals"
UNSCORED = math.inf  # the "fid" a checkpoint carries until evaluated: ranks it last, never best


def validate(checkpoint: ray.train.Checkpoint, run_dir: str, num_samples: int, seed: int,
             background: bool = False) -> dict:
    """The validation fn (a Ray task): score the checkpoint, write its card, return flat metrics."""
    from aigc_ray.eval.quality import flat_metrics, score_checkpoint

    if background:
        run_in_background()

    with checkpoint.as_directory() as local:
        card = score_checkpoint(local, num_samples, seed, own_checkpoint=True)  # this run's own
    storage.write_to(checkpoint.filesystem, f"{checkpoint.path}/card.json", json.dumps(card, indent=2).encode())
    metrics = flat_metrics(card)
    record_eval(run_dir, card, metrics, checkpoint.path)
    try:
        write_plot(run_dir, merge_evals(run_dir, read_history(run_dir)))
    except Exception as err:  # a plot must never fail an evaluation
        print(f"eval: could not draw metrics.png: {err}")
    return metrics


def record_eval(run_dir: str, card: dict, metrics: dict, checkpoint_path: str) -> None:
    """<run>/evals/epoch_N.json: what an evaluation measured (merged into metrics.jsonl), and its TensorBoard /
    MLflow record (tracking.log_evaluation: this is the one writer of an evaluation's numbers)."""
    record = {"epoch": card["epoch"], "step": card["step"], **metrics, "checkpoint": checkpoint_path}
    storage.write_json(storage.join(run_dir, EVALS, f"epoch_{card['epoch']:05d}.json"), record, indent=None)
    tracking.log_evaluation(run_dir, card["epoch"], metrics)  # the same numbers in TensorBoard (and MLflow)


def validation_config(cfg: ExperimentConfig, run_dir: str) -> ray.train.ValidationConfig:
    return ray.train.ValidationConfig(
        fn=validate,
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"run_dir": run_dir, "num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed,
                       "background": cfg.eval.background},
            timeout_s=cfg.eval.timeout_s or None),
        # a background evaluation's priority can't be raised back: a runtime_env of its own
        # gives it worker processes that no other task or actor is handed; importing aigc_ray
        # there lowers the priority before the task's heavy imports (aigc_ray/__init__.py)
        ray_remote_kwargs={"num_cpus": cfg.eval.cpus, "num_gpus": 0}
        | ({"runtime_env": {"env_vars": {"AIGC_RAY_EVAL_WORKER": "background"}}} if cfg.eval.background else {}))


def _list(directory: str) -> list[str]:
    fs, path = storage._fs(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".json"))


def read_history(run_dir: str) -> list[dict]:
    """The run's per-epoch metrics (metrics.jsonl)."""
    return storage.read_jsonl(storage.join(run_dir, "metrics.jsonl"))


def merge_evals(run_dir: str, history: list[dict]) -> list[dict]:
    """Copy each finished evaluation's numbers into the history row of its epoch (in place)."""
    fs, _ = storage._fs(run_dir)
    by_epoch = {}
    for path in _list(storage.join(run_dir, EVALS)):
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            record = json.loads(raw)
            by_epoch[record["epoch"]] = record
        except (ValueError, KeyError, TypeError):
            storage.warn(f"{path} is torn or not an evaluation record; skipping it")
    for row in history:
        record = by_epoch.get(row.get("epoch"))
        if record:
            row.update({k: v for k, v in record.items() if k not in ("epoch", "step", "checkpoint")})
    return history


def write_plot(run_dir: str, history: list[dict]) -> None:
    from aigc_ray.eval.plot import plot_history

    if history:
        storage.write_bytes(storage.join(run_dir, "metrics.png"), plot_history(history, run_dir.rstrip("/")[-60:]))


def finish_history(run_dir: str) -> list[dict]:
    """Driver side, after fit(): merge every evaluation into metrics.jsonl and draw metrics.png."""
    history = merge_evals(run_dir, read_history(run_dir))
    if history:
        storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history).encode())
        write_plot(run_dir, history)
    return history


def best_checkpoint(result) -> tuple[object, dict] | None:
    """(checkpoint, metrics) with the lowest evaluated fid among those Ray kept, or None."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if math.isfinite(m.get("fid", UNSCORED))]
    return min(scored, key=lambda cm: cm[1]["fid"]) if scored else None
