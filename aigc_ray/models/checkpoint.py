"""The self-describing checkpoint: a directory anyone can rebuild the generator from.

    model.safetensors   weights served and sampled (the EMA generator when EMA is on)
    config.json         {"format", "model": ModelConfig, "experiment": ExperimentConfig,
                         "step", "epoch", "ema", "dataset": {...}}
    train_state.pt      resume-only: raw G, D, optimizers, EMA state (loaded weights_only)
    card.json           quality card, written by `aigc-ray eval` (optional)
    card.<old>.json     a card of an older protocol, kept when a newer one replaced it (e.g. card.aigc-ray-card-1.json)

Only torch, safetensors and the config dataclasses are needed to load it (no Ray).

A checkpoint may come from anyone, so ``load_generator`` (the one loader everything calls)
trusts nothing in it: the config goes through the config's own validation (types, ranges,
size caps), the weights file's header (names, shapes, dtypes) is compared with the model
built on the meta device before anything is allocated, and the weights and a test output
must be finite.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from aigc_ray import storage
from aigc_ray.config import ConfigError, ExperimentConfig, ModelConfig
from aigc_ray.models import build_generator

FORMAT = "aigc-ray-checkpoint/1"
CARD_FORMAT = "aigc-ray-card/2"  # the quality protocol of aigc_ray/eval/quality.py (its one writer is write_card)
OLD_CARD_FORMATS = {
    "aigc-ray-card/1": "old protocol aigc-ray-card/1: one draw of N generated images against N train images, "
                       "no intervals, 64-d feature net; its numbers moved ~2x with the seed. Re-score with "
                       "`aigc-ray eval --checkpoint DIR`",
}
WEIGHTS, CONFIG, TRAIN_STATE, CARD = "model.safetensors", "config.json", "train_state.pt", "card.json"
# 2**27 parameters = 512 MiB in fp32: far above any shipped config (the largest has a few
# million), far below what would exhaust a serving replica. Checked on the meta device.
MAX_PARAMETERS = 2**27
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """The path is not a readable aigc-ray checkpoint."""


def save_checkpoint(directory: str | Path, *, experiment: ExperimentConfig, served_state: dict[str, torch.Tensor],
                    step: int, epoch: int, ema: bool, dataset: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in served_state.items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "model": experiment.to_dict()["model"], "experiment": experiment.to_dict(),
            "step": step, "epoch": epoch, "ema": ema, "dataset": dataset}
    storage.write_json(str(directory / CONFIG), meta)
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an aigc-ray checkpoint (no {CONFIG})")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def model_version(directory: str | Path) -> str:
    """A short stable id of the served weights: <family>-s<step>-<sha256 prefix>."""
    meta = read_meta(directory)
    digest = hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()[:10]
    return f"{meta['model']['family']}-s{meta['step']}-{digest}"


def model_config(meta: dict[str, Any]) -> ModelConfig:
    """The checkpoint's model config, through the config's own validation (types, ranges, caps)."""
    try:
        model = ExperimentConfig.from_dict(meta.get("experiment")).model
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{CONFIG}: {err}") from None
    try:  # the top-level copy (pre-registry checkpoints wrote flat family keys there) must agree
        same = ExperimentConfig.from_dict({**meta["experiment"], "model": meta.get("model")}).model == model
    except (ConfigError, TypeError):
        same = False
    if not same:
        raise CheckpointError(f"{CONFIG}: 'model' differs from 'experiment.model'")
    return model


class _SkipInit(TorchFunctionMode):
    """In-place initialisers (nn.init.normal_, ...) do nothing to meta tensors: there is nothing
    to fill, and torch's meta normal_ imports torch._dynamo (seconds) on first use."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, first = getattr(func, "__name__", ""), args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.endswith("__") and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        return func(*args, **kwargs)


_shapes_cache: dict[tuple[str, bool], dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}


def weight_shapes(cfg: ModelConfig, discriminator: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the generator's (or discriminator's) state, from a model built
    on the meta device: nothing allocated, whatever the config asks for. Cached per config: a
    meta build costs about a second for a spectral-norm model (its power iterations dispatch
    op by op), and an evaluation task loads a checkpoint of the same model every few epochs."""
    from dataclasses import asdict

    from aigc_ray.models import build_discriminator

    key = (json.dumps(asdict(cfg), sort_keys=True, default=str), discriminator)
    if key not in _shapes_cache:
        with torch.device("meta"), _SkipInit():
            module = build_discriminator(cfg) if discriminator else build_generator(cfg)
        _shapes_cache[key] = {k: (tuple(v.shape), v.dtype)
                              for k, v in (module.state_dict() if module is not None else {}).items()}
    return dict(_shapes_cache[key])


def _check_weights_header(weights: Path, cfg: ModelConfig) -> None:
    """Compare the safetensors header (read alone: no tensor data) with the model the config
    describes, built on the meta device (no memory): same names, shapes and dtypes."""
    expected = weight_shapes(cfg)
    count = sum(math.prod(shape) for shape, _ in expected.values())
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{CONFIG}: the model it describes has {count:,} parameters, over the "
                              f"{MAX_PARAMETERS:,} this loader accepts")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), _DTYPES.get(f.get_slice(k).get_dtype())) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"{WEIGHTS}: not a readable safetensors file ({err})") from None
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{WEIGHTS} does not match {CONFIG}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {found[k][0]} {found[k][1]}, expected {shape} {dtype}"
             for k, (shape, dtype) in expected.items() if found[k] != (shape, dtype)]
    if wrong:
        raise CheckpointError(f"{WEIGHTS} does not match {CONFIG}: {'; '.join(wrong[:3])}")


@torch.inference_mode()
def _check_test_output(model: torch.nn.Module, cfg: ModelConfig) -> None:
    family = cfg.family_spec
    if family.capabilities.generate:
        z = torch.randn(2, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(2) % cfg.num_classes if cfg.num_classes else None
        out = family.sample(model, z, labels)  # (2, C, S, S)
    else:
        out = family.reconstruct(model, torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size))
    if not torch.isfinite(out).all():
        raise CheckpointError(f"{WEIGHTS}: the model's test output is not finite")


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the served generator (eval mode) and return it with the checkpoint's meta.
    The one loader: checks everything (see the module doc) before and after allocating."""
    meta = read_meta(directory)
    cfg = model_config(meta)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    _check_weights_header(weights, cfg)
    state = load_file(str(weights), device="cpu")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{WEIGHTS}: non-finite values (NaN/Inf) in {bad[:3]}")
    model = build_generator(cfg)
    model.load_state_dict(state)
    model.eval()
    _check_test_output(model, cfg)
    return model.to(device), meta


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAIN_STATE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def read_card(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's quality card; None (with a warning) when it is absent, torn or not a card:
    the card is optional, so a bad one never makes a good checkpoint unusable. A card of an older
    protocol is returned marked: ``old_protocol`` says which and how to re-score (promote and
    canaries won't compare it with a current card)."""
    card = storage.read_json(str(Path(directory) / CARD))
    if card is not None and not (isinstance(card, dict) and isinstance(card.get("metrics"), dict)):
        storage.warn(f"{Path(directory) / CARD} is not a quality card; ignoring it")
        return None
    return mark_old_protocol(card) if card is not None else None


def mark_old_protocol(card: dict[str, Any]) -> dict[str, Any]:
    """The card with ``old_protocol`` set when its format is not CARD_FORMAT (a card from before intervals)."""
    fmt = card.get("format")
    if card.get("modality") == "text":  # a text model's card (models/text_checkpoint.py) has its own protocol
        return card
    if fmt != CARD_FORMAT and "old_protocol" not in card:
        card = {**card, "old_protocol": OLD_CARD_FORMATS.get(fmt, f"card format {fmt!r}, not {CARD_FORMAT}")}
    return card


def write_card(directory: str | Path, card: dict[str, Any]) -> Path:
    """Write card.json. A card of another format already there is kept beside it as card.<format>.json,
    marked old, so replacing it loses nothing."""
    path = Path(directory) / CARD
    previous = storage.read_json(str(path))
    if isinstance(previous, dict) and previous.get("format") != card.get("format"):
        name = str(previous.get("format") or "unknown").replace("/", "-")
        storage.write_json(str(Path(directory) / f"card.{name}.json"), mark_old_protocol(previous))
    storage.write_json(str(path), card)
    return path
