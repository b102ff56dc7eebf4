"""The self-describing text checkpoint (the image checkpoint's layout, checkpoint.py, for a language model):

    model.safetensors   the weights (the head is tied to the embedding, so stored once)
    config.json         {"format", "modality": "text", "model", "experiment", "vocab", "step", "epoch", "dataset"}
    train_state.pt      resume-only: optimizer state and progress (loaded weights_only)
    card.json           validation bits per byte with its interval, the n-gram baselines, a sample
    samples.txt         that sample, as text

Nothing in it is trusted: the config goes through TextExperimentConfig's validation (caps included), the
weights header is compared with the model built on the meta device before anything is allocated, and the
weights and a test forward pass must be finite. Torch, safetensors and the config only (no Ray).
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

from aigc_ray import storage
from aigc_ray.models.checkpoint import _DTYPES, MAX_PARAMETERS, CheckpointError, _SkipInit
from aigc_ray.models.text_registry import build_text_model

FORMAT = "aigc-ray-text-checkpoint/1"
WEIGHTS, CONFIG, TRAIN_STATE, CARD, SAMPLES = "model.safetensors", "config.json", "train_state.pt", "card.json", "samples.txt"


def is_text_checkpoint(directory: str | Path) -> bool:
    try:
        meta = json.loads((Path(directory) / CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("modality") == "text"


def save_text_checkpoint(directory: str | Path, *, experiment, state: dict[str, torch.Tensor], step: int, epoch: int,
                         dataset: dict, train_state: dict | None = None, card: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(directory / WEIGHTS),
              metadata={"format": FORMAT})
    d = experiment.to_dict()
    storage.write_json(str(directory / CONFIG), {"format": FORMAT, "modality": "text", "model": d["model"],
                                                 "experiment": d, "vocab": {"kind": d["model"]["vocab"], "size": 256},
                                                 "step": step, "epoch": epoch, "dataset": dataset})
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE)
    if card is not None:
        storage.write_json(str(directory / CARD), card)
        if card.get("sample"):
            (directory / SAMPLES).write_text(card["sample"]["prompt"] + card["sample"]["text"])
    return directory


def read_text_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an aigc-ray checkpoint (no {CONFIG})")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a text checkpoint (format {FORMAT} expected)")
    return meta


def text_config(meta: dict):
    from aigc_ray.text_config import ConfigError, TextExperimentConfig

    try:
        cfg = TextExperimentConfig.from_dict(meta.get("experiment"))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{CONFIG}: {err}") from None
    if meta.get("model") != cfg.to_dict()["model"]:
        raise CheckpointError(f"{CONFIG}: 'model' differs from 'experiment.model'")
    return cfg


def text_model_version(directory: str | Path) -> str:
    meta = read_text_meta(directory)
    digest = hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()[:10]
    return f"{meta['model']['family']}-s{meta['step']}-{digest}"


def load_text_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the language model (eval mode) from the checkpoint alone, checking everything first."""
    meta = read_text_meta(directory)
    cfg = text_config(meta).model
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    with torch.device("meta"), _SkipInit():
        expected = {k: (tuple(v.shape), v.dtype) for k, v in build_text_model(cfg).state_dict().items()}
    if sum(math.prod(s) for s, _ in expected.values()) > MAX_PARAMETERS:
        raise CheckpointError(f"{CONFIG}: the model it describes is over the {MAX_PARAMETERS:,}-parameter limit")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), _DTYPES.get(f.get_slice(k).get_dtype())) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{WEIGHTS}: not a readable safetensors file ({err})") from None
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise CheckpointError(f"{WEIGHTS} does not match {CONFIG}: {diff[:5]}")
    state = load_file(str(weights), device="cpu")
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in state.values()):
        raise CheckpointError(f"{WEIGHTS}: non-finite values (NaN/Inf)")
    model = build_text_model(cfg)
    model.load_state_dict(state)
    model.eval()
    with torch.inference_mode():
        logits, _ = model(torch.zeros(1, 2, dtype=torch.long))
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{WEIGHTS}: the model's test output is not finite")
    return model.to(device), meta
