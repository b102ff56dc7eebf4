"""Sweeps of text models with Ray Tune: ASHA over a text config's keys, scored by validation bits per byte.

A text sweep spec (tune/gpt_asha.yaml) says ``modality: text``; `aigc-ray tune --spec` hands it here. Each
trial is a Ray Train run of train/text_loop.py (so a trial can be multi-worker or on GPUs), its epoch
reports forwarded to Tune (TuneReportCallback); ASHA stops the trials whose val_bpb trails at a rung. The
best trial's best checkpoint is copied to OUT/best, a plain text checkpoint that `aigc-ray serve` serves as is.

Spec keys: name, base (a text config name or file), overrides, metric (val_bpb), mode (min), epochs,
num_samples, seed, space ({dotted key: {choice|uniform|loguniform|randint: [...]}}), scheduler
({grace_period, reduction_factor, min_rung_results, brackets}: tuning/asha.py's ResumableASHA), resources
({workers, cpus_per_worker, max_concurrent}), smoke (the same keys, merged with --smoke-test).

Trials live under STORAGE/<name> (STORAGE: --storage-path, default --out), their Train runs under
STORAGE/<name>/train/<trial id>, so ``--resume`` (Tuner.restore) finds each trial's Train run and resumes it from its
last checkpoint; the spec a sweep started with is kept beside it and a resume from another is refused.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from aigc_ray import storage
from aigc_ray.config import ConfigError, load_config

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SCHEDULER_KEYS = ("grace_period", "reduction_factor", "min_rung_results", "brackets")
RESERVED = {"train.epochs", "train.name", "train.out", "train.storage_path", "train.workers", "train.cpus_per_worker"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class TextSweepSpec:
    name: str
    """The sweep's name (its directory under --out)."""
    base: str
    """A shipped text config name (gpt-stdlib) or a YAML file."""
    space: dict
    """{dotted config key: {distribution: values}}; distributions: choice, uniform, loguniform, randint."""
    overrides: dict = field(default_factory=dict)
    """Fixed config keys for every trial."""
    metric: str = "val_bpb"
    """What trials are ranked by (lower is better)."""
    mode: str = "min"
    """min (val_bpb) or max."""
    epochs: int = 8
    """Epochs per trial (ASHA's max_t)."""
    num_samples: int = 8
    """Trials."""
    seed: int = 0
    """Seed of the random search."""
    scheduler: dict = field(default_factory=lambda: {"grace_period": 2, "reduction_factor": 2})
    """ASHA's grace_period and reduction_factor, in epochs."""
    resources: dict = field(default_factory=lambda: {"workers": 1, "cpus_per_worker": 1, "max_concurrent": 1})
    """Per trial: Train workers and CPUs per worker; trials at once."""
    modality: str = "text"
    """Always text."""

    def __post_init__(self) -> None:
        _check(self.mode in ("min", "max"), f"mode={self.mode!r}: min or max")
        _check(self.epochs > 0 and self.num_samples > 0, "epochs and num_samples must be positive")
        _check(isinstance(self.space, dict) and self.space, "space: give at least one searched key")
        for key, dist in self.space.items():
            _check(key not in RESERVED, f"space.{key} is set by the sweep itself")
            _check(isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS,
                   f"space.{key}: one of {DISTRIBUTIONS} with its values, e.g. {{choice: [64, 128]}}")
        cfg = self.base_config()
        for key, dist in self.space.items():  # every searched value must make a valid config
            kind, values = next(iter(dist.items()))
            for value in (values if kind == "choice" else values[:2]):
                try:
                    cfg.with_overrides({key: value})
                except ConfigError as err:
                    raise ConfigError(f"space.{key}={value!r}: {err}") from None
        _check(self.metric in ("val_bpb", "train_bpb"), f"metric={self.metric!r}: val_bpb or train_bpb")
        _check(isinstance(self.scheduler, dict) and set(self.scheduler) <= set(SCHEDULER_KEYS),
               f"scheduler: ASHA's keys are {SCHEDULER_KEYS}")
        for key, value in self.scheduler.items():
            low = 2 if key == "reduction_factor" else 1
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"scheduler.{key}={value!r}: an integer >= {low}")

    def base_config(self):
        cfg = load_config(self.base)
        _check(getattr(cfg, "modality", "image") == "text", f"base: {self.base} is not a text config")
        return cfg.with_overrides(self.overrides) if self.overrides else cfg


def is_text_spec(path: str) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("modality") == "text"


def load_text_spec(path: str, smoke: bool = False, num_samples: int | None = None) -> TextSweepSpec:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    small = raw.pop("smoke", {}) or {}
    if smoke:
        for key, value in small.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and key != "space" else value
    if num_samples is not None:
        raw["num_samples"] = num_samples
    known = set(TextSweepSpec.__dataclass_fields__)
    _check(not set(raw) - known, f"unknown spec key(s) {sorted(set(raw) - known)}; known: {sorted(known)}")
    return TextSweepSpec(**raw)


def _domain(kind: str, values: list):
    import ray.tune

    return {"choice": ray.tune.choice, "uniform": lambda v: ray.tune.uniform(*v),
            "loguniform": lambda v: ray.tune.loguniform(*v), "randint": lambda v: ray.tune.randint(*v)}[kind](values)


def text_trial(config: dict, sweep: dict) -> None:
    """One trial: a Ray Train text run, every epoch's report forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aigc_ray.data.text import ensure_prepared_text, read_text_manifest
    from aigc_ray.train.text_loop import build_text_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    spec = TextSweepSpec(**sweep["spec"])
    r = spec.resources
    cfg = spec.base_config().with_overrides({**config["space"], "train.name": trial_id, "train.out": sweep["out"],
                                             "train.storage_path": sweep["train_storage"],
                                             "train.epochs": spec.epochs, "train.workers": r.get("workers", 1),
                                             "train.cpus_per_worker": r.get("cpus_per_worker", 1)})
    prepared = ensure_prepared_text(cfg.data)
    trainer, _ = build_text_trainer(cfg, prepared, read_text_manifest(prepared), sweep["baselines"],
                                    callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error


def run_text_sweep(spec: TextSweepSpec, out: str = "runs/tune", *, storage_path: str | None = None,
                   resume: bool = False, address: str | None = None) -> dict:
    """Run (or with ``resume`` continue) the sweep; return (and write to OUT/summary.json) its trials, the best
    and where it was exported. Trials and checkpoints live under STORAGE_PATH/<name> (default OUT/<name>)."""
    import numpy as np
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    from aigc_ray.data.text import ensure_prepared_text, load_tokens
    from aigc_ray.text_quality import baselines
    from aigc_ray.train.loop import init_ray
    from aigc_ray.tuning.asha import ResumableASHA
    from aigc_ray.tuning.sweep import HISTORY, ProgressLines

    _check(not storage.is_uri(out), f"--out {out}: a local directory (summary.json and best/); put the trials on "
                                    "s3:// / gs:// with --storage-path")
    local = Path(out).expanduser().resolve()
    root = storage.resolve(storage_path or out)
    experiment = storage.join(root, spec.name)
    check_resumable(spec, experiment, resume)  # before the corpus is read or Ray starts
    base = spec.base_config()
    prepared = ensure_prepared_text(base.data)
    floor = baselines(np.asarray(load_tokens(prepared, "train")), np.asarray(load_tokens(prepared, "validation")),
                      base.model.block_size, base.eval.max_blocks)
    init_ray(address, spec.resources.get("workers", 1))
    sweep = {"spec": asdict(spec), "out": str(local), "train_storage": storage.join(experiment, "train"),
             "baselines": floor}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(text_trial, sweep=sweep), {"CPU": 0.01})
    if resume:  # Tune restores the trials (finished ones kept, the rest resumed from their Train checkpoints)
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, restart_errored=True)
    else:
        storage.write_json(storage.join(experiment, SPEC_FILE), asdict(spec))
        concurrent = spec.resources.get("max_concurrent", 1)
        print(f"text sweep {spec.name}: {spec.num_samples} trial(s), ASHA, {spec.epochs} epoch(s) each, up to "
              f"{concurrent} at once; metric {spec.metric} ({spec.mode})", file=sys.stderr, flush=True)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"space": {k: _domain(*next(iter(d.items()))) for k, d in spec.space.items()}},
            tune_config=ray.tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                # its rungs are saved beside the experiment: Tune restores trials, not the scheduler
                scheduler=ResumableASHA(storage.join(experiment, "asha_rungs.json"), time_attr="epoch",
                                        max_t=spec.epochs, **spec.scheduler),
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrent),
                reuse_actors=False, trial_dirname_creator=lambda trial: trial.trial_id),  # stable: a restore finds them
            run_config=ray.tune.RunConfig(name=spec.name, storage_path=root, verbose=0,
                                          callbacks=[ProgressLines(spec.metric, storage.join(experiment, HISTORY))]))
    results = tuner.fit()
    # what Tune saved, not its in-memory view (which calls the trials it stopped on Ctrl-C "TERMINATED")
    statuses = {t.trial_id: t.status for t in ray.tune.ExperimentAnalysis(experiment).trials}
    interrupted = len(statuses) < spec.num_samples or any(s not in ("TERMINATED", "ERROR") for s in statuses.values())
    rows = sorted((_row(spec, r, root, storage.join(experiment, HISTORY)) for r in results), key=lambda row: row["trial"])
    scored = [row for row in rows if row[spec.metric] is not None and row["checkpoint"]]
    best = (min if spec.mode == "min" else max)(scored, key=lambda row: row[spec.metric]) if scored else None
    exported = _export(best["checkpoint"], str(local / "best")) if best and not interrupted else None
    summary = {"sweep": spec.name, "experiment": experiment, "metric": spec.metric, "mode": spec.mode,
               "interrupted": interrupted, "trials": rows, "best": best, "exported": exported}
    storage.write_json(str(local / "summary.json"), summary)
    return summary


SPEC_FILE = "text_sweep_spec.json"  # <experiment>/: the spec it was started with, checked by --resume


def check_resumable(spec: TextSweepSpec, experiment: str, resume: bool) -> None:
    """--resume needs the sweep, started from the same spec; a fresh start needs no sweep there."""
    started = storage.exists(storage.join(experiment, "tuner.pkl"))
    if resume and not started:
        raise ConfigError(f"--resume: no text sweep to resume at {experiment}")
    if not resume and started:
        raise ConfigError(f"sweep {spec.name!r} already exists at {experiment}; pass --resume to continue it, "
                          "or another --out / --storage-path")
    if resume:
        saved = storage.read_json(storage.join(experiment, SPEC_FILE))
        changed = sorted(k for k, v in asdict(spec).items() if not isinstance(saved, dict) or saved.get(k) != v)
        if changed:
            raise ConfigError(f"--resume: the sweep at {experiment} was started from another spec (differs in: "
                              f"{', '.join(changed)}); resume with the same --spec, --smoke-test and --num-samples")


def _row(spec: TextSweepSpec, result, root: str, history: str) -> dict:
    """A trial's line of the summary: its best report (the metric and the checkpoint made with it), read from
    the sweep's own record of every report (tuning/sweep.py's ProgressLines). Train's TuneReportCallback
    hands Tune each checkpoint's path in the report, not the checkpoint itself, so Tune's result has none."""
    from aigc_ray.tuning.sweep import read_history

    trial_id = Path(result.path).name  # trial_dirname_creator: the trial's directory is its id
    records = read_history(history, trial_id)
    scored = [r for r in records if isinstance(r.get(spec.metric), (int, float)) and math.isfinite(r[spec.metric])]
    top = (min if spec.mode == "min" else max)(scored, key=lambda r: r[spec.metric]) if scored else {}
    checkpoint = top.get("checkpoint_path") if isinstance(top.get("checkpoint_path"), str) else None
    checkpoint = checkpoint and storage.in_scheme_of(root, checkpoint)
    return {"trial": trial_id, "config": (result.config or {}).get("space"),
            "epochs": max((int(r.get("epoch") or 0) for r in records), default=0), spec.metric: top.get(spec.metric),
            "best_epoch": top.get("epoch"), "checkpoint": checkpoint,
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error else None}


def _export(checkpoint: str, dest: str) -> str:
    """Copy the checkpoint (a plain text checkpoint with its card) to dest, replacing what was there."""
    target = Path(dest)
    shutil.rmtree(target, ignore_errors=True)
    with storage.localized(checkpoint) as local:
        shutil.copytree(local, target, ignore=shutil.ignore_patterns("*.tmp"))
    return str(target)
