"""Run a sweep: build the Tuner from a SweepSpec, print one line per trial report, then a
summary table, and export the best trial's best checkpoint to <out>/best."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from aigc_ray import storage
from aigc_ray.config import ConfigError
from aigc_ray.tuning import driver, evaluation, watch
from aigc_ray.tuning.asha import ResumableASHA
from aigc_ray.tuning.spec import Dimension, SweepSpec

HISTORY = "history"  # <experiment>/history/<trial id>.jsonl: every report of each trial
SKIP_IN_LINES = {"epoch", "step", "images_per_s", "epoch_time_s", "checkpoint_path", "fid_floor"}


def _domain(dim: Dimension):
    if dim.kind == "grid":
        return ray.tune.grid_search(dim.values)
    return {"choice": lambda: ray.tune.choice(dim.values),
            "uniform": lambda: ray.tune.uniform(*dim.values),
            "loguniform": lambda: ray.tune.loguniform(*dim.values),
            "randint": lambda: ray.tune.randint(*dim.values)}[dim.kind]()


def param_space(spec: SweepSpec) -> dict[str, Any]:
    if spec.search_alg == "grid":  # every dimension is grid or choice: cross them all
        return {"space": {d.key: ray.tune.grid_search(d.values) for d in spec.space}}
    return {"space": {d.key: _domain(d) for d in spec.space}}


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class ProgressLines(ray.tune.Callback):
    """One line per trial report instead of Tune's table, and each report appended to
    ``<experiment>/history/<trial id>.jsonl``: the sweep's own record of every report. Tune's
    result.json can't serve: a trial restarted by PBT (or a resume) re-downloads it from the
    storage copy, which lags the driver's, and loses the reports made since the last sync."""

    def __init__(self, metric: str, history_dir: str):
        self.metric = metric
        self.history_dir = history_dir

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # result["config"] is what the trial ran with; trial.config may already hold what a PBT
        # exploit decided on this very result
        record = {k: v for k, v in result.items() if k != "config"} | {"config": result.get("config", trial.config)}
        path = history_path(self.history_dir, trial.trial_id)
        previous = storage.read_bytes(path) if storage.exists(path) else b""  # (no appends on s3)
        storage.write_bytes(path, previous + json.dumps(record, default=str).encode() + b"\n")
        epoch = result.get("epoch", 0)
        wanted = {self.metric, "kid", "fid_ratio", "fid_lo", "fid_hi"} | _LOSSES
        shown = {k: v for k, v in result.items()
                 if isinstance(v, (int, float)) and k in wanted and k not in SKIP_IN_LINES}
        params = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in trial.config.get("space", {}).items())
        values = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(shown.items(), key=lambda kv: kv[0] != self.metric))
        print(f"[{trial.trial_id}] epoch {epoch:g} {values}  ({params})", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"[{trial.trial_id}] finished", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{trial.trial_id}] FAILED: {trial.error_file}", file=sys.stderr, flush=True)


_LOSSES = {"loss_g", "loss_d", "loss"}


def history_path(history_dir: str, trial_id: str) -> str:
    return storage.join(history_dir, f"{trial_id}.jsonl")


def read_history(history_dir: str, trial_id: str) -> list[dict]:
    """Every report of the trial, in order (see ProgressLines)."""
    return storage.read_jsonl(history_path(history_dir, trial_id))


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    best: float | None  # best value of the metric over the trial's reports
    epochs: int  # epochs trained
    scored_epochs: int  # last epoch that carries the metric
    stopped_early: bool
    status: str
    checkpoint: str | None  # the checkpoint that scored ``best``
    error: str | None = None  # a failed trial's reason, in one line


@dataclass
class SweepOutcome:
    spec: SweepSpec
    experiment: str
    rows: list[TrialRow]
    best: TrialRow | None
    exported: str | None
    card: dict | None
    interrupted: bool = False  # stopped (Ctrl-C) before every trial finished: resume with --resume

    @property
    def trial_epochs(self) -> int:
        return sum(r.epochs for r in self.rows)


def max_concurrent(spec: SweepSpec) -> int:
    """Trials that fit the cluster at once. The trial's driver function itself takes no
    resources (it waits on its TorchTrainer), so Tune alone would start them all; each trial
    also needs a CPU beside its workers for its Ray Data reads and its evaluation tasks (with
    none free, Ray Data waits forever)."""
    resources = ray.cluster_resources()
    cpus, gpus, r = int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), spec.resources
    fit = max(1, cpus // (r.cpus + 1))
    if r.gpus:
        if gpus < r.gpus:
            raise ConfigError(f"resources: a trial needs {r.gpus} GPU(s) but the cluster has {gpus}")
        fit = min(fit, gpus // r.gpus)
    if spec.max_concurrent_trials:
        fit = min(fit, spec.max_concurrent_trials)
    return fit


def _sweep_info(spec: SweepSpec, root: str, out: str) -> dict[str, Any]:
    return {"base": spec.base_config().to_dict(), "train_storage": storage.join(root, spec.name, driver.TRAIN_RUNS),
            "out": out, "metric": spec.metric, "uses_eval": spec.uses_eval, "eval_samples": spec.eval_samples,
            "epochs": spec.epochs, "perturbation_interval": spec.scheduler.perturbation_interval,
            "start_timeout_s": spec.start_timeout_s}


def _trainable(spec: SweepSpec, info: dict[str, Any]):
    fn = driver.run_pbt_trial if spec.scheduler.type == "pbt" else driver.run_trial
    # the driver function only waits on its TorchTrainer, whose workers hold the trial's
    # resources (Tune refuses an empty bundle, hence a token share of a CPU)
    return ray.tune.with_resources(ray.tune.with_parameters(fn, sweep=info), {"CPU": 0.01})


def _scheduler(spec: SweepSpec, experiment: str):
    s = spec.scheduler
    if s.type == "asha":
        return ResumableASHA(storage.join(experiment, "asha_rungs.json"), time_attr="epoch", max_t=spec.epochs,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor, brackets=s.brackets,
                             min_rung_results=s.min_rung_results)
    if s.type == "pbt":
        dims = {d.key: d for d in spec.space}
        mutations = {k: (dims[k].values if dims[k].kind in ("choice", "grid") else _domain(dims[k]))
                     for k in spec.mutated_keys()}
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations={"space": mutations}, quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch)
    return FIFOScheduler()


def _search_alg(spec: SweepSpec, concurrent: int):
    if spec.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ConfigError(f"search_alg=optuna needs the optuna package (pip install optuna): {err}") from None
        return OptunaSearch(seed=spec.seed)
    # (Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator it is handed)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent)


def run_sweep(spec: SweepSpec, *, out: str = "runs/tune", storage_path: str | None = None, resume: bool = False,
              address: str | None = None, export: bool = True) -> SweepOutcome:
    """Run (or with ``resume`` continue) the sweep; return its table and exported best."""
    from aigc_ray.train.loop import init_ray

    root = storage.resolve(storage_path or out)
    experiment = storage.join(root, spec.name)
    restorable = _restorable(experiment)
    if resume and not restorable:
        raise ConfigError(f"--resume: no sweep to resume at {experiment}")
    if not resume and restorable:
        raise ConfigError(f"sweep {spec.name!r} already exists at {experiment}; pass --resume to continue it, "
                          "or another --out / --storage-path")
    init_ray(address, spec.resources.workers)
    # epochs are reported as trained; their FID arrives later, as a separate result (the
    # evaluation runs beside training), so not every result carries the metric
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    info = _sweep_info(spec, root, storage.resolve(out))
    trainable = _trainable(spec, info)
    if resume:
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, restart_errored=True)
    else:
        concurrent = max_concurrent(spec)
        print(f"sweep {spec.name}: {spec.num_samples} sample(s), {spec.scheduler.type}, up to {concurrent} trial(s) "
              f"at once, {spec.epochs} epoch(s) each; metric {spec.metric} ({spec.mode})", file=sys.stderr, flush=True)
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=ray.tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=_scheduler(spec, experiment),
                search_alg=_search_alg(spec, concurrent),
                max_concurrent_trials=concurrent if spec.search_alg == "optuna" else None, reuse_actors=False,
                trial_dirname_creator=lambda trial: trial.trial_id),  # stable: a restore finds them
            run_config=ray.tune.RunConfig(
                name=spec.name, storage_path=root, verbose=0,
                callbacks=[ProgressLines(spec.metric, storage.join(experiment, HISTORY)),
                           watch.SweepWatch(spec.name, info["train_storage"], spec.status_every_s)],
                # a PBT trial at its budget stops; without this PBT would pause it at its last
                # perturbation and restart it for nothing. (ASHA/FIFO trials end when their
                # function returns: their last FID arrives after the last epoch's report.)
                stop={"epoch": spec.epochs} if spec.scheduler.type == "pbt" else None,
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=spec.metric,
                                                            checkpoint_score_order=spec.mode)))
    results = tuner.fit()
    # what Tune saved, not its in-memory view (which calls trials it stopped on Ctrl-C
    # "TERMINATED"): an interrupted sweep has unfinished or not yet created trials
    statuses = {t.trial_id: t.status for t in ray.tune.ExperimentAnalysis(experiment).trials}
    interrupted = (any(status not in ("TERMINATED", "ERROR") for status in statuses.values())
                   or len(statuses) < expected_trials(spec))
    rows = [_row(spec, r, root, storage.join(experiment, HISTORY)) for r in results]
    rows.sort(key=lambda r: r.trial_id)
    scored = [r for r in rows if r.best is not None and r.checkpoint]
    best = (min if spec.mode == "min" else max)(scored, key=lambda r: r.best) if scored else None
    exported, card = None, None
    if export and best is not None and not interrupted:  # an interrupted sweep exports once resumed
        exported, card = export_best(spec, best.checkpoint, storage.join(storage.resolve(out), "best"))
    for row in rows:
        row.status = statuses.get(row.trial_id, row.status)
        row.stopped_early = row.stopped_early and row.status == "TERMINATED"
    outcome = SweepOutcome(spec=spec, experiment=experiment, rows=rows, best=best, exported=exported, card=card,
                           interrupted=interrupted)
    _write_summary(outcome, storage.resolve(out))
    return outcome


def expected_trials(spec: SweepSpec) -> int:
    """How many trials the sweep creates: grid dimensions are crossed, then repeated num_samples times."""
    grid = [d for d in spec.space if d.kind == "grid" or spec.search_alg == "grid"]
    return spec.num_samples * math.prod(len(d.values) for d in grid)


def _restorable(experiment: str) -> bool:
    return storage.exists(storage.join(experiment, "tuner.pkl"))


def _row(spec: SweepSpec, result, root: str, history_dir: str) -> TrialRow:
    # the trial's directory is named after its id (trial_dirname_creator); result.metrics may be
    # the last result of the trial a PBT exploit cloned, with that trial's id
    trial_id = Path(result.path).name
    records = read_history(history_dir, trial_id)
    if not records and result.metrics_dataframe is not None:  # a sweep from before history/ existed
        records = result.metrics_dataframe.to_dict("records")
    epochs = max([int(math.floor(r.get("epoch") or 0)) for r in records] or [0])
    better = min if spec.mode == "min" else max
    scored = [r for r in records if _finite(r.get(spec.metric))]
    best_value, checkpoint, scored_epochs = None, None, 0
    if scored:
        top = better(scored, key=lambda r: r[spec.metric])
        best_value, scored_epochs = float(top[spec.metric]), max(int(r.get("epoch") or 0) for r in scored)
        checkpoint = top.get("checkpoint_path") if isinstance(top.get("checkpoint_path"), str) else None
    if spec.scheduler.type == "pbt" or checkpoint is None:
        checkpoint = _best_tune_checkpoint(result, spec) or checkpoint
    checkpoint = checkpoint and storage.in_scheme_of(root, checkpoint)
    status = "ERROR" if result.error else "TERMINATED"
    return TrialRow(trial_id=str(trial_id), params=dict((result.config or {}).get("space", {})), best=best_value,
                    epochs=epochs, scored_epochs=scored_epochs, stopped_early=scored_epochs < spec.epochs and not result.error,
                    status=status, checkpoint=checkpoint, error=_error_line(result.error))


def _error_line(error: BaseException | None) -> str | None:
    """The last line of a trial's error (Ray's wrappers put the traceback first), minus the
    exception's dotted class name: "trial T could not start within 180s ..."."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, sep, rest = lines[-1].partition(": ")
    return rest if sep and "." in head and " " not in head else lines[-1]


def _best_tune_checkpoint(result, spec: SweepSpec) -> str | None:
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if _finite(m.get(spec.metric))]
    if not pairs:
        return None
    better = min if spec.mode == "min" else max
    return better(pairs, key=lambda cm: cm[1][spec.metric])[0].path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def export_best(spec: SweepSpec, checkpoint: str, dest: str) -> tuple[str, dict | None]:
    """Copy the checkpoint to ``dest`` (replacing it) and write its quality card there. ``dest``
    may be an s3:// / gs:// / file:// URI: the copy is made locally, then uploaded."""
    if storage.is_uri(dest):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="aigc-best-") as tmp:
            _, card = export_best(spec, checkpoint, str(Path(tmp, "best")))
            storage.upload_dir(str(Path(tmp, "best")), dest)
        return dest, card
    target = Path(dest)
    if target.exists():
        shutil.rmtree(target)
    with storage.localized(checkpoint) as local:
        shutil.copytree(local, target, ignore=shutil.ignore_patterns("*.tmp"))
    from aigc_ray.models.checkpoint import read_card

    card = read_card(target)  # written by the evaluation during training
    if card is None and not evaluation.unavailable():
        scores = evaluation.score_checkpoint(str(target), num_samples=spec.eval_samples or None, write_card=True)
        card = read_card(target) or scores
    return str(target), card


def _write_summary(outcome: SweepOutcome, out: str) -> None:
    summary = {"sweep": outcome.spec.name, "experiment": outcome.experiment, "metric": outcome.spec.metric,
               "mode": outcome.spec.mode, "epochs_budget": outcome.spec.epochs, "trial_epochs": outcome.trial_epochs,
               "best": dataclasses.asdict(outcome.best) if outcome.best else None, "exported": outcome.exported,
               "trials": [dataclasses.asdict(r) for r in outcome.rows]}
    storage.write_json(storage.join(out, "summary.json"), summary)


def format_table(outcome: SweepOutcome) -> str:
    spec = outcome.spec
    keys = [d.key for d in spec.space]
    header = ["trial", *[_short(k) for k in keys], spec.metric, "epochs", "stopped early", "status"]
    lines = [header]
    for r in outcome.rows:
        lines.append([r.trial_id, *[_fmt(r.params.get(k, "")) for k in keys],
                      _fmt(r.best) if r.best is not None else "-", str(r.epochs), "yes" if r.stopped_early else "no",
                      r.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    failed = [r for r in outcome.rows if r.error]
    if failed:
        text += "\n\nfailed trials:\n" + "\n".join(f"  {r.trial_id}: {r.error}" for r in failed)
    if outcome.best:
        b = outcome.best
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in b.params.items())
        text += f"\n\nbest trial: {b.trial_id} {spec.metric}={_fmt(b.best)} ({params})"
    text += f"\ntrial-epochs spent: {outcome.trial_epochs}"
    return text
