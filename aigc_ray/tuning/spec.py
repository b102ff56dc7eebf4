"""Sweep specs: the YAML that `aigc-ray tune --spec` reads, as typed, validated dataclasses.

A spec names a base training config plus overrides, a search space over config keys
(dotted, as in ``--set``), a scheduler, a search algorithm and a budget. Everything that
can be checked without running a trial is checked here, so a bad spec fails before any
trial starts, with a message naming the key. No Ray imports: the Tune objects are built
in ``sweep.py`` from these plain values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aigc_ray.config import ConfigError, ExperimentConfig, load_config

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "pbt", "fifo")
SEARCH_ALGS = ("random", "grid", "optuna")
# What the domain-FID evaluation (aigc_ray.eval) adds on evaluated epochs, for every family (one
# that cannot generate is scored on its reconstructions). A family's own per-step metrics, the
# settings that mean something for it and those PBT may mutate come from its registered object.
# Each is the mean over eval.draws generator draws; _lo / _hi are its 95% interval (fid_hi: rank by the
# pessimistic end, so a lucky draw doesn't win a rung).
EVAL_METRICS = {"fid", "kid", "fid_floor", "fid_ratio", "kid_ratio",
                "fid_lo", "fid_hi", "fid_ratio_lo", "fid_ratio_hi", "kid_lo", "kid_hi"}
# PBT clones weights between trials, so it may only mutate what leaves the weights' shapes alone
# (plus each family's pbt_mutable_options, as model.options.<name>).
PBT_MUTABLE_PREFIXES = ("train.lr_g", "train.lr_d", "train.beta1", "train.beta2", "train.critic_steps",
                        "train.batch_size", "train.ema_decay", "data.random_crop",
                        "data.rotation_degrees", "data.scale_range", "data.horizontal_flip")
# Set by the sweep itself (one value per trial or per sweep), never searched.
RESERVED_KEYS = {"train.epochs", "train.name", "train.out", "train.storage_path", "train.workers",
                 "train.use_gpu", "train.cpus_per_worker", "model.family", "model.image_size", "model.channels",
                 "data.image_size", "data.channels", "data.dataset"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class Dimension:
    """One searched config key and its distribution."""
    key: str
    """Dotted config key, e.g. ``train.lr_g`` (the same names ``--set`` takes)."""
    kind: str
    """choice | grid | uniform | loguniform | randint (randint's upper bound is exclusive)."""
    values: list
    """The choices (choice, grid) or the [low, high] bounds (uniform, loguniform, randint)."""

    def __post_init__(self) -> None:
        where = f"space.{self.key}"
        _check(self.kind in DISTRIBUTIONS, f"{where}: unknown distribution {self.kind!r}; use one of {DISTRIBUTIONS}")
        _check(isinstance(self.values, list) and len(self.values) > 0, f"{where}.{self.kind} must be a non-empty list")
        if self.kind in ("uniform", "loguniform", "randint"):
            _check(len(self.values) == 2, f"{where}.{self.kind} must be [low, high], got {self.values!r}")
            low, high = self.values
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            _check(numeric and math.isfinite(low) and math.isfinite(high), f"{where}.{self.kind} bounds must be numbers")
            _check(low < high, f"{where}.{self.kind}: low {low} must be below high {high}")
            if self.kind == "loguniform":
                _check(low > 0, f"{where}.loguniform bounds must be positive")
            if self.kind == "randint":
                _check(all(isinstance(v, int) for v in (low, high)), f"{where}.randint bounds must be integers")

    def representatives(self) -> list:
        """Values that stand for the whole range when checking it against the config."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


@dataclass
class SchedulerSpec:
    """Trial scheduler and its parameters (all in epochs)."""
    type: str = "asha"
    """asha (stop poor trials early) | pbt (exploit/explore, mutates hyperparameters) | fifo (run all to the end)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 3.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    brackets: int = 1
    """ASHA: number of brackets."""
    min_rung_results: int = 1
    """ASHA: results a rung must hold before it stops anyone; above 1, a trial that passed a rung
    early is judged again once the rung holds that many (1: Tune's ASHA, first arrivals pass)."""
    perturbation_interval: int = 2
    """PBT: epochs between exploit/explore decisions (each trial trains this long per segment)."""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction copies the top fraction's weights and hyperparameters."""
    resample_probability: float = 0.25
    """PBT: chance a mutated value is drawn afresh from the space instead of perturbed."""
    mutations: list[str] = field(default_factory=list)
    """PBT: which space keys it mutates; empty = every space key PBT may mutate."""
    synch: bool = False
    """PBT: wait for every trial to reach the perturbation point before exploiting (deterministic,
    slower with uneven trials)."""

    def __post_init__(self) -> None:
        _check(self.type in SCHEDULERS, f"scheduler.type={self.type!r} is unknown; use one of {SCHEDULERS}")
        _check(self.grace_period >= 1, "scheduler.grace_period must be >= 1")
        _check(self.reduction_factor > 1, "scheduler.reduction_factor must be > 1")
        _check(self.brackets >= 1, "scheduler.brackets must be >= 1")
        _check(self.min_rung_results >= 1, "scheduler.min_rung_results must be >= 1")
        _check(self.perturbation_interval >= 1, "scheduler.perturbation_interval must be >= 1")
        _check(0 < self.quantile_fraction <= 0.5, "scheduler.quantile_fraction must be in (0, 0.5]")
        _check(0 <= self.resample_probability <= 1, "scheduler.resample_probability must be in [0, 1]")


@dataclass
class Resources:
    """What one trial uses: a Ray Train run of ``workers`` data-parallel workers."""
    workers: int = 1
    """Ray Train workers per trial (train.workers)."""
    gpus_per_worker: int = 0
    """0 (CPU) or 1 GPU per worker (train.use_gpu)."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker (train.cpus_per_worker)."""

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "resources.workers must be >= 1")
        _check(self.gpus_per_worker in (0, 1), "resources.gpus_per_worker must be 0 or 1")
        _check(self.cpus_per_worker >= 1, "resources.cpus_per_worker must be >= 1")

    @property
    def cpus(self) -> int:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker


@dataclass
class SweepSpec:
    name: str
    """Sweep name: the experiment directory under the storage path (a rerun with --resume continues it)."""
    base: str = "dcgan-digits"
    """Named shipped config (``aigc-ray train --config`` names) or a YAML config file."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys fixed for every trial, e.g. {train.batch_size: 64}."""
    space: list[Dimension] = field(default_factory=list)
    """The search space, one dimension per dotted config key."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Trial scheduler."""
    search_alg: str = "random"
    """random (grid dimensions are crossed, the rest sampled) | grid (every dimension grid/choice) | optuna."""
    num_samples: int = 8
    """Trials (random/optuna), or repeats of the full grid (grid)."""
    epochs: int = 10
    """Epoch budget per trial (train.epochs; ASHA's max_t)."""
    metric: str = "fid"
    """The metric trials are ranked and scheduled by."""
    mode: str = "min"
    """min | max."""
    eval_every: int = 1
    """With an evaluation metric (fid, ...): evaluate every this many epochs (eval.every_epochs)."""
    eval_samples: int = 0
    """Generated images per evaluation (eval.num_samples); 0 = the base config's."""
    seed: int = 0
    """Seed of the search (which configurations are drawn); trials keep the config's train.seed."""
    resources: Resources = field(default_factory=Resources)
    """Per-trial resources."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster's CPUs/GPUs fit."""
    start_timeout_s: float = 180.0
    """Seconds a trial's Train run may take to start: its workers placed, then its data's first
    batch read. Past it the trial fails with a message naming the resources it waited for and
    who holds them, and the sweep goes on. Sized to a loaded 2-core machine, where a smoke trial
    starts in about 30 s."""
    status_every_s: float = 60.0
    """Seconds between the sweep's status lines (running trials, waiting, finished, failed)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.replace("-", "").replace("_", "").isalnum(),
               f"name={self.name!r} must be letters, digits, - or _")
        _check(self.search_alg in SEARCH_ALGS, f"search_alg={self.search_alg!r} is unknown; use one of {SEARCH_ALGS}")
        _check(self.num_samples >= 1, "num_samples must be >= 1")
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.mode in ("min", "max"), f"mode={self.mode!r} must be min or max")
        _check(self.eval_every >= 1, "eval_every must be >= 1")
        _check(self.max_concurrent_trials >= 0, "max_concurrent_trials must be >= 0")
        _check(self.start_timeout_s > 0, "start_timeout_s must be > 0")
        _check(0 < self.status_every_s <= 60,
               "status_every_s must be in (0, 60]: a sweep says what it does at least every minute")
        _check(self.eval_samples == 0 or self.eval_samples >= 10, "eval_samples must be 0 or >= 10")
        _check(len(self.space) > 0, "space is empty: a sweep needs at least one searched key")
        self.base_config()  # resolves and validates base + overrides + every searched value

    # --- derived --------------------------------------------------------------------------
    @property
    def uses_eval(self) -> bool:
        return self.metric in EVAL_METRICS

    def fixed_overrides(self) -> dict[str, Any]:
        """What every trial gets on top of the base config, besides its searched values."""
        r = self.resources
        fixed = dict(self.overrides) | {"train.epochs": self.epochs, "train.workers": r.workers,
                                        "train.use_gpu": r.gpus_per_worker > 0, "train.cpus_per_worker": r.cpus_per_worker}
        if self.uses_eval:
            # a scored epoch needs a checkpoint to score
            fixed |= {"eval.enabled": True, "eval.every_epochs": self.eval_every,
                      "train.checkpoint_every_epochs": self.eval_every,
                      # every scored checkpoint stays, so the best can be exported
                      "train.keep_checkpoints": self.epochs // self.eval_every + 1}
            if self.eval_samples:
                fixed["eval.num_samples"] = self.eval_samples
        else:  # ranked by a training metric: spend nothing on evaluation
            fixed["eval.enabled"] = False
        if self.scheduler.type == "pbt":
            fixed["train.checkpoint_every_epochs"] = 1  # segments end on an epoch boundary
        return fixed

    def base_config(self) -> ExperimentConfig:
        cfg = load_config(self.base)
        _check(all(isinstance(k, str) for k in self.overrides), "overrides keys must be dotted config keys")
        try:
            cfg = cfg.with_overrides(self.fixed_overrides())
        except ConfigError as err:
            raise ConfigError(f"overrides: {err}") from None
        family = cfg.model.family_spec
        self._check_metric(family)
        seen = set()
        for dim in self.space:
            _check(dim.key not in seen, f"space.{dim.key} appears twice")
            seen.add(dim.key)
            _check(dim.key not in RESERVED_KEYS,
                   f"space.{dim.key} is set by the sweep itself (epochs/resources/model family/image size), not searched")
            for value in dim.representatives():
                try:
                    cfg.with_overrides({dim.key: value})
                except ConfigError as err:
                    if "means nothing for model family" in str(err):  # the key itself, not the value
                        raise ConfigError(f"space.{dim.key}: {err}") from None
                    raise ConfigError(f"space.{dim.key}: value {value!r} is not valid: {err}") from None
        if self.search_alg == "grid":
            bad = [d.key for d in self.space if d.kind not in ("grid", "choice")]
            _check(not bad, f"search_alg=grid needs grid/choice dimensions; space.{', space.'.join(bad)} are not")
        if self.search_alg == "optuna":
            bad = [d.key for d in self.space if d.kind == "grid"]
            _check(not bad, f"search_alg=optuna can't take grid dimensions: space.{', space.'.join(bad)}")
        if self.scheduler.type == "pbt":
            self._check_pbt(family)
        from aigc_ray.train.tracking import check as check_tracking  # (no Ray import)

        check_tracking(cfg)  # track.mlflow_uri in the overrides, without mlflow installed: before any trial
        return cfg

    def _check_metric(self, family) -> None:
        reported = family.train_metrics | EVAL_METRICS
        _check(self.metric in reported,
               f"metric={self.metric!r} is not reported by model family {family.name!r}; it reports {sorted(reported)}")
        if self.uses_eval:
            from aigc_ray.tuning import evaluation

            missing = evaluation.unavailable()
            _check(not missing, f"metric={self.metric!r} needs the domain-FID evaluation: {missing}")

    def _check_pbt(self, family) -> None:
        mutable = PBT_MUTABLE_PREFIXES + tuple(f"model.options.{o}" for o in sorted(family.pbt_mutable_options))
        keys = {d.key for d in self.space}
        for key in self.scheduler.mutations:
            _check(key in keys, f"scheduler.mutations: {key!r} is not a space key")
        for key in self.mutated_keys():
            _check(key in mutable, f"space.{key}: PBT can't mutate it (cloned weights would not fit); mutable: {mutable}")
        _check(self.mutated_keys(), "scheduler.type=pbt needs at least one mutable space key")
        _check(self.search_alg == "random", "scheduler.type=pbt draws its own configurations: use search_alg=random")
        interval = self.scheduler.perturbation_interval
        _check(self.epochs >= interval, "epochs must be >= scheduler.perturbation_interval for PBT to perturb at all")
        if self.uses_eval:  # each segment must end on a scored epoch
            _check(interval % self.eval_every == 0 and self.epochs % self.eval_every == 0,
                   f"eval_every={self.eval_every} must divide scheduler.perturbation_interval and epochs for PBT")

    def mutated_keys(self) -> list[str]:
        if self.scheduler.type != "pbt":
            return []
        if self.scheduler.mutations:
            return list(self.scheduler.mutations)
        return [d.key for d in self.space]


_TOP_KEYS = {f.name for f in dataclasses.fields(SweepSpec)}
_SMOKE_KEYS = {"overrides", "space", "scheduler", "num_samples", "epochs", "eval_every", "eval_samples", "resources",
               "max_concurrent_trials", "start_timeout_s", "status_every_s"}


def _typed(cls, raw: Any, where: str):
    """Build a flat dataclass from a mapping, rejecting unknown keys and wrong types by name."""
    _check(isinstance(raw, dict), f"{where} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    _check(not unknown, f"unknown key(s) {sorted(f'{where}.{k}' for k in unknown)}; known: {sorted(fields)}")
    for key, value in raw.items():
        expected = {"int": int, "float": (int, float), "str": str, "list[str]": list, "bool": bool}[str(fields[key].type)]
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        _check(ok, f"{where}.{key} must be {fields[key].type}, got {type(value).__name__} {value!r}")
    return cls(**raw)


def _space(raw: Any) -> list[Dimension]:
    _check(isinstance(raw, dict), "space must be a mapping of dotted config keys to distributions")
    dims = []
    for key, dist in raw.items():
        _check(isinstance(dist, dict) and len(dist) == 1,
               f"space.{key} must be one distribution, e.g. {{loguniform: [1e-4, 1e-3]}} or {{choice: [32, 64]}}")
        (kind, values), = dist.items()
        dims.append(Dimension(key=str(key), kind=str(kind), values=values))
    return dims


def spec_from_dict(raw: Any, *, smoke: bool = False) -> SweepSpec:
    """Parse a spec mapping. ``smoke`` applies its ``smoke:`` section (a tiny variant for CI):
    overrides are merged, the space's keys replaced, the other values replaced."""
    _check(isinstance(raw, dict), "a sweep spec must be a mapping")
    unknown = set(raw) - _TOP_KEYS - {"smoke"}
    _check(not unknown, f"unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS | {'smoke'})}")
    raw = dict(raw)
    smoke_raw = raw.pop("smoke", None) or {}
    _check(isinstance(smoke_raw, dict), "smoke must be a mapping")
    bad = set(smoke_raw) - _SMOKE_KEYS
    _check(not bad, f"unknown key(s) {sorted(f'smoke.{k}' for k in bad)}; known: {sorted(_SMOKE_KEYS)}")
    if smoke:
        for key, value in smoke_raw.items():
            if key in ("overrides", "space", "scheduler", "resources"):
                _check(isinstance(value, dict), f"smoke.{key} must be a mapping")
                raw[key] = {**(raw.get(key) or {}), **value}
            else:
                raw[key] = value
    _check("name" in raw, "name is missing: every sweep needs a name")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "space":
            kwargs[key] = _space(value)
        elif key == "scheduler":
            kwargs[key] = _typed(SchedulerSpec, value or {}, "scheduler")
        elif key == "resources":
            kwargs[key] = _typed(Resources, value or {}, "resources")
        elif key == "overrides":
            _check(isinstance(value, dict), "overrides must be a mapping of dotted config keys to values")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = value
    scalar = {"name": str, "base": str, "search_alg": str, "metric": str, "mode": str,
              "num_samples": int, "epochs": int, "eval_every": int, "eval_samples": int, "seed": int,
              "max_concurrent_trials": int}
    for key, typ in scalar.items():
        if key in kwargs:
            v = kwargs[key]
            _check(isinstance(v, typ) and not isinstance(v, bool), f"{key} must be {typ.__name__}, got {v!r}")
    for key in ("start_timeout_s", "status_every_s"):
        if key in kwargs:
            v = kwargs[key]
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{key} must be a number of seconds, got {v!r}")
    if smoke:
        kwargs["name"] = f"{kwargs['name']}-smoke"
    return SweepSpec(**kwargs)


def load_spec(path: str | Path, *, smoke: bool = False, num_samples: int | None = None) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    spec = spec_from_dict(raw, smoke=smoke)
    if num_samples is not None:
        spec = dataclasses.replace(spec, num_samples=num_samples)
    return spec
