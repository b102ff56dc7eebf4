"""The self-describing checkpoint: a directory anyone can rebuild the generator from.

    model.safetensors   weights served and sampled (the EMA generator when EMA is on)
    config.json         {"format", "model": ModelConfig, "experiment": ExperimentConfig,
                         "step", "epoch", "ema", "dataset": {...}}
    train_state.pt      resume-only: raw G, D, optimizers, EMA state (loaded weights_only)
    card.json           quality card, written by `aigc-ray eval` (optional)

Only torch, safetensors and the config dataclasses are needed to load it (no Ray).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aigc_ray.config import ExperimentConfig
from aigc_ray.models import build_generator

FORMAT = "aigc-ray-checkpoint/1"
WEIGHTS, CONFIG, TRAIN_STATE, CARD = "model.safetensors", "config.json", "train_state.pt", "card.json"


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
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an aigc-ray checkpoint (no {CONFIG})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def model_version(directory: str | Path) -> str:
    """A short stable id of the served weights: <family>-s<step>-<sha256 prefix>."""
    meta = read_meta(directory)
    digest = hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()[:10]
    return f"{meta['model']['family']}-s{meta['step']}-{digest}"


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the served generator (eval mode) and return it with the checkpoint's meta."""
    meta = read_meta(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS}")
    model = build_generator(ExperimentConfig.from_dict(meta["experiment"]).model)
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval(), meta


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAIN_STATE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def read_card(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / CARD
    return json.loads(path.read_text()) if path.is_file() else None


def write_card(directory: str | Path, card: dict[str, Any]) -> Path:
    path = Path(directory) / CARD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2))
    tmp.replace(path)
    return path
