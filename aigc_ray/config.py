"""Typed configuration: one object travels CLI -> Train -> Tune -> checkpoint -> Serve.

Each dataclass validates itself in ``__post_init__`` so a bad value fails where it is
written, with a message naming the field. ``ExperimentConfig.to_dict``/``from_dict`` are
the only serialisation; YAML files and checkpoints both go through them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

VALID_IMAGE_SIZES = (8, 16, 32, 64, 128)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MAX_LATENT_DIM, MAX_WIDTH, MAX_NUM_CLASSES = 4096, 1024, 10_000


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DataConfig:
    dataset: str = "digits"
    """Source: digits | shapes | mnist | fashion-mnist | cifar10 | folder:PATH | parquet:PATH
    (a directory written by ``aigc-ray prepare``)."""
    data_root: str = "~/.cache/aigc-ray"
    """Where torchvision datasets live and where prepared Parquet copies are cached."""
    download: bool = False
    """Allow torchvision sources to download into ``data_root`` (needs network)."""
    image_size: int = 16
    """Side length in pixels after preparation; a power of two from 8 to 128."""
    channels: int = 1
    """1 (grey) or 3 (RGB) after preparation."""
    num_shapes: int = 4096
    """How many images the procedural ``shapes`` source draws."""
    # Augmentation is off by default: applied to the real images only, a GAN's generator learns
    # it (its digits come out shifted, tilted and zoomed). Measured on dcgan-digits, 60 epochs:
    # domain FID 8.4 with crop+rotation+zoom on, 2.0 with them off (floor 0.47).
    random_crop: bool = False
    """Augment with a random translation of up to 1/8 of the side (a pad-and-crop)."""
    rotation_degrees: float = 0.0
    """Augment with a random rotation in [-d, d] degrees; 0 turns it off."""
    scale_range: float = 0.0
    """Augment with a random zoom in [1-s, 1+s]; 0 turns it off."""
    horizontal_flip: bool = False
    """Augment with a random left-right flip (off by default: flipped digits are not digits)."""
    cache_in_memory_mb: int = 512
    """A worker's shard smaller than this is decoded once and kept in memory (on the
    training device: GPU-resident on CUDA) for later epochs instead of being re-read through
    Ray Data; 0 turns the cache off."""

    def __post_init__(self) -> None:
        _check(self.image_size in VALID_IMAGE_SIZES,
               f"data.image_size={self.image_size} is not supported; use one of {VALID_IMAGE_SIZES}")
        _check(self.channels in (1, 3), f"data.channels={self.channels} must be 1 or 3")
        _check(self.num_shapes > 0, "data.num_shapes must be positive")
        _check(0 <= self.rotation_degrees <= 180, "data.rotation_degrees must be in [0, 180]")
        _check(0 <= self.scale_range < 1, "data.scale_range must be in [0, 1)")
        _check(self.cache_in_memory_mb >= 0, "data.cache_in_memory_mb must be >= 0")

    @property
    def augment(self) -> bool:
        return self.random_crop or self.rotation_degrees > 0 or self.scale_range > 0 or self.horizontal_flip


@dataclass
class ModelConfig:
    family: str = "dcgan"
    """A registered model family (aigc_ray/models/registry.py): dcgan | wgan-gp | vae | ae |
    seed-recipe | ... (`aigc-ray train --help` lists them)."""
    image_size: int = 16
    """Generated side length; must equal data.image_size."""
    channels: int = 1
    """Generated channels; must equal data.channels."""
    latent_dim: int = 64
    """Size of z."""
    width: int = 64
    """Base channel count; layers use width * 2^k, capped at width * 8."""
    num_classes: int = 0
    """0 = unconditional; > 0 = class-conditional with this many labels (families that can)."""
    options: dict = field(default_factory=dict)
    """The family's own settings (e.g. vae: beta, recon_loss), checked by the family's Options
    dataclass; a key the family does not know is an error. Read them typed as ``.opts``."""

    def __post_init__(self) -> None:
        from aigc_ray.models.registry import UnknownFamilyError, families_accepting, get_family

        try:
            family = get_family(self.family)
        except UnknownFamilyError as err:
            raise ConfigError(str(err)) from None
        _check(self.image_size in VALID_IMAGE_SIZES,
               f"model.image_size={self.image_size} can't be built; sizes that work: {VALID_IMAGE_SIZES}")
        _check(self.channels in (1, 3), f"model.channels={self.channels} must be 1 or 3")
        # upper caps: a checkpoint's config is read from a file anyone may have written, and
        # these sizes decide what building the model allocates (see models/checkpoint.py)
        _check(0 < self.latent_dim <= MAX_LATENT_DIM, f"model.latent_dim must be in 1..{MAX_LATENT_DIM}")
        _check(0 < self.width <= MAX_WIDTH, f"model.width must be in 1..{MAX_WIDTH}")
        _check(0 <= self.num_classes <= MAX_NUM_CLASSES, f"model.num_classes must be in 0..{MAX_NUM_CLASSES}")
        _check(self.num_classes == 0 or family.capabilities.conditional,
               f"model.num_classes: model family {self.family!r} is not class-conditional")
        if dataclasses.is_dataclass(self.options):  # a typed Options object (e.g. from asdict's input)
            self.options = dataclasses.asdict(self.options)
        _check(isinstance(self.options, dict), f"model.options must be a mapping, got {type(self.options).__name__}")
        for key in self.options:
            _check(key in family.option_names,
                   f"model.options.{key} means nothing for model family {self.family!r}"
                   + (f"; families that take it: {', '.join(families_accepting(key))}" if families_accepting(key)
                      else f"; {self.family} takes: {', '.join(family.option_names) or 'no options'}"))
        try:
            self._opts = family.Options(**self.options)
        except TypeError as err:
            raise ConfigError(f"model.options: {err}") from None
        # keep every option written out, so a checkpoint or a YAML dump says what was used
        self.options = dataclasses.asdict(self._opts)
        family.check(self)

    @property
    def opts(self):
        """The family's Options dataclass for these settings (validated)."""
        return self._opts

    @property
    def family_spec(self):
        """The registered family object (aigc_ray.models.registry.ModelFamily)."""
        from aigc_ray.models.registry import get_family

        return get_family(self.family)


@dataclass
class TrainConfig:
    epochs: int = 60
    """Passes over the training set."""
    batch_size: int = 64
    """Global batch size, split evenly across workers."""
    lr_g: float = 2e-4
    """Adam learning rate of the generator (or of the VAE/AE)."""
    lr_d: float = 2e-4
    """Adam learning rate of the discriminator / critic."""
    beta1: float = 0.5
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    critic_steps: int = 1
    """Discriminator updates per generator update (5 is usual for WGAN-GP)."""
    ema_decay: float = 0.999
    """Decay of the generator's exponential moving average; 0 turns EMA off."""
    lr_decay_start: float = 1.0
    """Fraction of the epochs after which both learning rates fall linearly, epoch by epoch, towards 0 at
    the end of the last one; 1.0 keeps them constant. A GAN's samples keep moving at a constant rate;
    the decay lets the last epochs settle (dcgan-digits: 0.7)."""
    seed: int = 42
    """Seed for weights, noise and data order (the source documents ask for 42)."""
    workers: int = 1
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: bool = False
    """One GPU per worker; turns on the CUDA fast path below (each switch has no effect on CPU
    unless its doc says so)."""
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32. auto: bf16 autocast on CUDA (fp16 with a grad scaler on GPUs
    without bf16), fp32 on CPU. An explicit bf16 is honoured on CPU too (CPU autocast); fp16 on
    CPU falls back to fp32."""
    channels_last: bool = True
    """Keep images and conv weights in NHWC on CUDA (tensor-core friendly); ignored on CPU."""
    compile: bool = False
    """torch.compile G and D (the WGAN-GP critic stays eager: its penalty needs double
    backward). Honoured on CPU too; the first steps pay the compile time."""
    cuda_graphs: bool = True
    """Capture the whole training step (forwards, backwards, fused Adam) as CUDA graphs after a
    few warm-up steps and replay them: one launch per step instead of hundreds. CUDA only; off
    with more than one worker (DDP), with fp16 (its grad scaler syncs), and if capture fails."""
    cpus_per_worker: int = 0
    """CPUs reserved per worker (and torch threads); 0 = share this machine's cores evenly."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many batches (optimizer steps of D, or of the VAE)."""
    checkpoint_every_epochs: int = 10
    """Also write one at the end of every this many epochs, and always at the end."""
    keep_checkpoints: int = 2
    """How many checkpoints Ray Train keeps."""
    max_failures: int = 3
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    sample_every: int = 1
    """Write the fixed-noise 8x8 sample grid every this many epochs."""
    max_steps: int = 0
    """Stop after this many generator steps (0 = no limit); for smoke tests and benchmarks."""
    out: str = "runs"
    """Local directory for run outputs (sample grids, metrics) and the default storage."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints: a shared path or s3:// / gs:// URI; empty = <out>."""
    name: str = ""
    """Run name; empty = <model>-<dataset>. A rerun with the same name resumes."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "critic_steps", "workers", "checkpoint_every", "checkpoint_every_epochs",
                     "keep_checkpoints", "sample_every"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_g", "lr_d"):
            _check(0 < getattr(self, name) < 1, f"train.{name} must be in (0, 1)")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0, 1)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay must be in [0, 1)")
        _check(0 <= self.lr_decay_start <= 1, f"train.lr_decay_start must be in [0, 1], got {self.lr_decay_start}")
        _check(self.max_failures >= -1, "train.max_failures must be >= -1 (-1 = retry forever)")
        _check(self.max_steps >= 0 and self.cpus_per_worker >= 0, "train.max_steps/cpus_per_worker must be >= 0")
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        for name in ("channels_last", "compile", "cuda_graphs"):
            _check(isinstance(getattr(self, name), bool), f"train.{name} must be bool, got {getattr(self, name)!r}")
        _check(self.batch_size >= self.workers,
               f"train.batch_size={self.batch_size} is smaller than train.workers={self.workers}")


@dataclass
class EvalConfig:
    every_epochs: int = 5
    """Score a checkpoint every this many epochs during training, and always at the end (0 = only
    at the end). Ray keeps the best checkpoints by FID, and `aigc-ray train` names the best."""
    num_samples: int = 1000
    """Generated images per draw, each draw compared with the whole train split; capped at the test
    split's size (the floor is that many held-out real images, and a draw must be the same size to
    share its small-N bias; half of it for a family that only reconstructs test images)."""
    draws: int = 10
    """Independent generator draws per evaluation: every score is their mean with a 95% interval
    (aigc_ray/eval/quality.py); a promotion compares two models draw by draw on the same seeds."""
    enabled: bool = True
    """Evaluate during/after training at all."""
    seed: int = 0
    """Seed of the draws' latents (draw d uses seed * 1000 + d) and of the floor's resampling (same seed, same numbers)."""
    cpus: float = 1.0
    """CPUs reserved for each evaluation task; 0 schedules it without a reservation (for a cluster
    whose CPUs the training workers take entirely: a reserved task would wait there)."""
    timeout_s: float = 900.0
    """An evaluation still unfinished after this many seconds is cancelled (its checkpoint stays
    unscored); 0 = no limit."""
    background: bool = True
    """Run the evaluation task as a background job (Linux SCHED_IDLE; elsewhere the lowest nice):
    where it shares CPUs with busy training workers, it gets only the CPU they leave idle and
    finishes later instead of slowing them. (Ray already runs every worker at nice 15, so a
    nice value alone has almost no room left.) False = equal footing with training."""

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 0, "eval.every_epochs must be >= 0")
        _check(self.num_samples >= 10, "eval.num_samples must be >= 10")
        _check(2 <= self.draws <= 1000, "eval.draws must be 2..1000 (an interval needs at least 2 draws)")
        _check(self.cpus >= 0, "eval.cpus must be >= 0")
        _check(self.timeout_s >= 0, "eval.timeout_s must be >= 0 (0 = no limit)")


@dataclass
class TrackConfig:
    tensorboard: bool = True
    """TensorBoard event files in the run directory, beside metrics.jsonl: losses, D outputs, images/s, each
    evaluation's metrics (with floor and interval), the epoch sample grids and the resolved config
    (`tensorboard --logdir runs/`; aigc_ray/train/tracking.py)."""
    mlflow_uri: str = ""
    """Also log the run to MLflow at this tracking URI (e.g. file:./mlruns or http://HOST:5000), through Ray's
    MLflow integration; needs mlflow installed (`pip install mlflow`, not a dependency). "" = off."""
    mlflow_experiment: str = "aigc-ray"
    """The MLflow experiment runs are logged under (created when missing)."""

    def __post_init__(self) -> None:
        _check(bool(self.mlflow_experiment.strip()), "track.mlflow_experiment must not be empty")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        _check(self.model.image_size == self.data.image_size,
               f"model.image_size={self.model.image_size} differs from data.image_size={self.data.image_size}")
        _check(self.model.channels == self.data.channels,
               f"model.channels={self.model.channels} differs from data.channels={self.data.channels}")

    @property
    def run_name(self) -> str:
        if self.train.name:
            return self.train.name
        dataset = self.data.dataset.split(":")[0]
        return f"{self.model.family}-{dataset}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        _check(isinstance(raw, dict), "a config must be a mapping of sections")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        _check(not unknown, f"unknown config section(s): {sorted(unknown)}; known: {sorted(sections)}")
        raw = _migrate_family_keys(raw)
        kwargs = {}
        for name, section_cls in _SECTION_TYPES.items():
            values = raw.get(name) or {}
            _check(isinstance(values, dict), f"config section {name!r} must be a mapping")
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = set(values) - set(known)
            _check(not bad, f"unknown key(s) {sorted(f'{name}.{k}' for k in bad)}")
            for key, value in values.items():
                _check_type(f"{name}.{key}", known[key], value)
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """Return a copy with dotted keys replaced, e.g. {"train.lr_g": 1e-4, "model.options.beta": 4};
        validated anew. A key that means nothing for the model family is an error."""
        raw = self.to_dict()
        if overrides.get("model.family", self.model.family) != self.model.family:
            raw["model"]["options"] = {}  # the old family's options mean nothing to the new one
        for dotted, value in overrides.items():
            *path, key = dotted.split(".")
            node = raw
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            options = path == ["model", "options"]  # the family's own keys: checked by the family
            _check(isinstance(node, dict) and (key in node or options) and len(path) >= 1,
                   f"unknown config key {dotted!r}")
            node[key] = value
        cfg = ExperimentConfig.from_dict(raw)
        check_family_keys(cfg, overrides)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
                  "track": TrackConfig}
_TYPE_NAMES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}
# Settings that were flat fields before they moved to their family's options (checkpoints and
# configs written before then still load): (section, key) -> the option's name.
_LEGACY_FAMILY_KEYS = {("model", "beta"): ("beta", 1.0), ("model", "recon_loss"): ("recon_loss", "bce"),
                       ("train", "gp_weight"): ("gp_weight", 10.0)}


def _migrate_family_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Move pre-registry flat keys into ``model.options`` when the family takes them; drop them
    where they held their old default for a family that never used them (old checkpoints wrote
    every key for every family); anything else is an error naming the key."""
    if not any(isinstance(raw.get(sec), dict) and key in raw[sec] for sec, key in _LEGACY_FAMILY_KEYS):
        return raw
    from aigc_ray.models.registry import UnknownFamilyError, get_family

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    model = raw.setdefault("model", {})
    try:
        family = get_family(model.get("family", ModelConfig.family))
    except UnknownFamilyError as err:
        raise ConfigError(str(err)) from None
    options = dict(model.get("options") or {})
    for (section, key), (option, old_default) in _LEGACY_FAMILY_KEYS.items():
        if key not in (raw.get(section) or {}):
            continue
        value = raw[section].pop(key)
        if option in family.option_names:
            options.setdefault(option, value)
        else:
            _check(value == old_default, f"{section}.{key} means nothing for model family {family.name!r}")
    model["options"] = options
    return raw


def check_family_keys(cfg: ExperimentConfig, given: Any) -> None:
    """``given``: the dotted keys a user wrote (a config file's, --set's, a sweep's). A train key
    that only some families use (train.lr_d, train.critic_steps) is an error for the others."""
    from aigc_ray.models.registry import _FAMILIES

    family = cfg.model.family_spec
    for dotted in given:
        section, _, key = dotted.partition(".")
        users = [f.name for f in _FAMILIES.values() if key in f.train_keys]
        _check(section != "train" or not users or key in family.train_keys_for(cfg.model),
               f"{dotted} means nothing for model family {family.name!r}; families that use it: {', '.join(users)}")


def _check_type(name: str, f: dataclasses.Field, value: Any) -> None:
    expected = _TYPE_NAMES[f.type if isinstance(f.type, str) else f.type.__name__]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected == (int, float) and isinstance(value, float):
        ok = ok and math.isfinite(value)
    _check(ok, f"{name} must be {f.type}, got {type(value).__name__} {value!r}")


def named_configs() -> list[str]:
    """The configs shipped in aigc_ray/configs (usable as ``--config NAME``)."""
    files = resources.files("aigc_ray.configs").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None) -> ExperimentConfig:
    """Load a shipped config by name, or a YAML file by path; None gives the defaults. A file that says
    ``modality: text`` gives a TextExperimentConfig (aigc_ray/text_config.py) instead."""
    if not name_or_path:
        return ExperimentConfig()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        shipped = resources.files("aigc_ray.configs") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"no config named {name_or_path!r}; shipped: {', '.join(named_configs())}")
        text = shipped.read_text()
    raw = yaml.safe_load(text) or {}
    if isinstance(raw, dict) and raw.get("modality") == "text":  # a language-model run (text_config.py)
        from aigc_ray.text_config import TextExperimentConfig

        return TextExperimentConfig.from_dict(raw)
    cfg = ExperimentConfig.from_dict(raw)
    check_family_keys(cfg, [f"{sec}.{key}" for sec, values in raw.items() if isinstance(values, dict) for key in values])
    return cfg
