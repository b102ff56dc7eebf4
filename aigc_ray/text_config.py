"""Typed configuration of a text (language-model) run: the same journey as ExperimentConfig,
CLI -> Train -> checkpoint -> Serve, one object and no second copy of a default.

A YAML config is a text config when it says ``modality: text`` (config.load_config dispatches on it).
Each dataclass validates itself in ``__post_init__`` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from aigc_ray.config import PRECISIONS, ConfigError, _check, _check_type

VOCABS = {"bytes": 256}  # vocabulary kind -> size; bytes: every UTF-8 text encodes, nothing is out of vocabulary
MAX_WIDTH, MAX_DEPTH, MAX_BLOCK = 2048, 48, 8192  # caps: a checkpoint's config decides what building allocates


@dataclass
class TextDataConfig:
    dataset: str = "stdlib"
    """stdlib (a fixed list of the running Python's own standard-library sources, offline) | text:PATH (a UTF-8
    file or a folder of them) | parquet:PATH (a ``text`` string column)."""
    data_root: str = "~/.cache/aigc-ray"
    """Where prepared token shards are cached (prepared/text-<hash>)."""
    max_file_bytes: int = 64 * 2**20
    """Source files larger than this are skipped and counted (judged from the file's size, before reading)."""
    validation_every: int = 10
    """The corpus is cut into 4 KiB chunks; every this many-th chunk is validation (10 = 10%), the rest train."""

    def __post_init__(self) -> None:
        _check(self.max_file_bytes > 0, "data.max_file_bytes must be positive")
        _check(self.validation_every >= 2, "data.validation_every must be >= 2")


@dataclass
class TextModelConfig:
    family: str = "gpt"
    """A registered text model family (aigc_ray/models/text_registry.py): gpt | rnn-lm."""
    vocab: str = "bytes"
    """The vocabulary, stored in the checkpoint: bytes (256 byte values of UTF-8)."""
    block_size: int = 128
    """Context length trained on (and a learned-position gpt's most positions)."""
    width: int = 128
    """Embedding / hidden width."""
    depth: int = 4
    """Transformer blocks, or recurrent layers."""
    dropout: float = 0.0
    """Dropout probability during training."""
    options: dict = field(default_factory=dict)
    """The family's own settings (gpt: heads, positions; rnn-lm: cell), checked by its Options dataclass."""

    def __post_init__(self) -> None:
        from aigc_ray.models import gpt, rnn_lm  # noqa: F401  (registers the text families)
        from aigc_ray.models.text_registry import get_text_family

        try:
            family = get_text_family(self.family)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check(self.vocab in VOCABS, f"model.vocab={self.vocab!r}: use one of {tuple(VOCABS)}")
        _check(0 < self.block_size <= MAX_BLOCK, f"model.block_size must be in 1..{MAX_BLOCK}")
        _check(0 < self.width <= MAX_WIDTH, f"model.width must be in 1..{MAX_WIDTH}")
        _check(0 < self.depth <= MAX_DEPTH, f"model.depth must be in 1..{MAX_DEPTH}")
        _check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(isinstance(self.options, dict), "model.options must be a mapping")
        for key in self.options:
            _check(key in family.option_names, f"model.options.{key} means nothing for text model family "
                   f"{self.family!r}; it takes: {', '.join(family.option_names)}")
        try:
            self._opts = family.Options(**self.options)
            self.options = dataclasses.asdict(self._opts)
            family.check(self)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    @property
    def opts(self):
        return self._opts

    @property
    def vocab_size(self) -> int:
        return VOCABS[self.vocab]


@dataclass
class TextTrainConfig:
    epochs: int = 10
    """Epochs; an epoch here is train.steps_per_epoch optimizer steps, then a validation and a checkpoint."""
    steps_per_epoch: int = 200
    """Optimizer steps per epoch (windows are drawn at random from the training split)."""
    batch_size: int = 32
    """Global batch of windows of model.block_size + 1 bytes, split evenly across workers."""
    lr: float = 2e-3
    """AdamW peak learning rate (linear warm-up, then cosine down to lr / 10 at the last step)."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0 = off)."""
    seed: int = 42
    """Seed of the weights and of the windows drawn."""
    workers: int = 1
    """Ray Train workers (data-parallel replicas, DDP)."""
    use_gpu: bool = False
    """One GPU per worker (AMP per train.precision)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."""
    compile: bool = False
    """torch.compile the model (the first steps pay the compile time)."""
    cpus_per_worker: int = 0
    """CPUs reserved per worker (and torch threads); 0 = share this machine's cores evenly."""
    max_time_s: float = 0.0
    """Stop after this many seconds of training (0 = no limit): the equal-wall-clock comparisons use it."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (0 = epochs x steps_per_epoch)."""
    keep_checkpoints: int = 2
    """How many checkpoints Ray Train keeps (the best by validation bits per byte, plus the latest)."""
    max_failures: int = 3
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    out: str = "runs"
    """Local directory for run outputs and the default storage."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints: a shared path or s3:// / gs:// URI; empty = <out>."""
    name: str = ""
    """Run name; empty = <family>-<dataset>. A rerun with the same name resumes."""

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size", "workers", "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _check(0 < self.lr < 1, "train.lr must be in (0, 1)")
        _check(self.warmup_steps >= 0 and self.max_steps >= 0 and self.cpus_per_worker >= 0,
               "train.warmup_steps/max_steps/cpus_per_worker must be >= 0")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0 and self.max_time_s >= 0,
               "train.weight_decay/grad_clip/max_time_s must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2 must be in [0, 1)")
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r}: use one of {PRECISIONS}")
        _check(self.max_failures >= -1, "train.max_failures must be >= -1")
        _check(self.batch_size >= self.workers, "train.batch_size must be >= train.workers")


@dataclass
class TextEvalConfig:
    max_blocks: int = 0
    """Validation blocks (model.block_size bytes each, contiguous, not overlapping) scored per epoch, evenly
    spaced over the validation split; 0 = all of them."""
    sample_prompt: str = "def "
    """Prompt of the sample written into each checkpoint's card (samples.txt)."""
    sample_tokens: int = 300
    """Bytes generated for that sample."""
    seed: int = 0
    """Seed of that sample."""

    def __post_init__(self) -> None:
        _check(self.max_blocks >= 0, "eval.max_blocks must be >= 0")
        _check(0 < self.sample_tokens <= 10_000, "eval.sample_tokens must be in 1..10000")


@dataclass
class TextExperimentConfig:
    modality: str = "text"
    """Always text: what tells a text config, run and checkpoint from an image one."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: TextModelConfig = field(default_factory=TextModelConfig)
    train: TextTrainConfig = field(default_factory=TextTrainConfig)
    eval: TextEvalConfig = field(default_factory=TextEvalConfig)

    def __post_init__(self) -> None:
        _check(self.modality == "text", f"modality={self.modality!r}: a text config says modality: text")

    @property
    def run_name(self) -> str:
        return self.train.name or f"{self.model.family}-{self.data.dataset.split(':')[0]}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextExperimentConfig:
        _check(isinstance(raw, dict), "a config must be a mapping of sections")
        unknown = set(raw) - {"modality", *_SECTIONS}
        _check(not unknown, f"unknown config section(s): {sorted(unknown)}; known: {sorted(_SECTIONS)}")
        kwargs: dict[str, Any] = {"modality": raw.get("modality", "text")}
        for name, section_cls in _SECTIONS.items():
            values = raw.get(name) or {}
            _check(isinstance(values, dict), f"config section {name!r} must be a mapping")
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = set(values) - set(known)
            _check(not bad, f"unknown key(s) {sorted(f'{name}.{k}' for k in bad)}")
            for key, value in values.items():
                _check_type(f"{name}.{key}", known[key], value)
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> TextExperimentConfig:
        """A copy with dotted keys replaced ({"train.lr": 1e-3, "model.options.heads": 2}), validated anew."""
        raw = self.to_dict()
        if overrides.get("model.family", self.model.family) != self.model.family:
            raw["model"]["options"] = {}
        for dotted, value in overrides.items():
            *path, key = dotted.split(".")
            node: Any = raw
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            _check(isinstance(node, dict) and bool(path) and (key in node or path == ["model", "options"]),
                   f"unknown config key {dotted!r} for a text config")
            node[key] = value
        return TextExperimentConfig.from_dict(raw)


_SECTIONS = {"data": TextDataConfig, "model": TextModelConfig, "train": TextTrainConfig, "eval": TextEvalConfig}


def is_text_config(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("modality") == "text"


__all__ = ["ConfigError", "TextDataConfig", "TextEvalConfig", "TextExperimentConfig", "TextModelConfig",
           "TextTrainConfig", "is_text_config"]
