"""The model-family registry: one object per family owns everything family-specific.

A family (dcgan, wgan-gp, vae, ae, seed-recipe, ...) says how to build its networks from a
``ModelConfig``, how one training step goes (pure torch, see steps.py), how to sample and
reconstruct, which metrics its step reports, which settings mean something for it, and what it
can do. Train, eval, tuning, serving and export look a family up by name here and ask it; they
never branch on the name. Adding a family is one module that subclasses ``ModelFamily`` and
calls ``register`` (imported from ``aigc_ray/models/__init__.py``), one shipped config and its
tests; see the README's "Adding a model family".

Torch only: nothing here imports Ray (the config is duck-typed, so this file needs no config import).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Capabilities:
    generate: bool
    """Samples images from a prior: latents (N, latent_dim) -> images."""
    reconstruct: bool
    """Has an encoder: images -> latents -> images."""
    conditional: bool
    """Accepts model.num_classes > 0 (labels in G and D)."""
    adversarial: bool
    """Has a discriminator/critic, so train.lr_d and train.critic_steps mean something."""


@dataclass
class NoOptions:
    """A family without settings of its own."""


@dataclass
class TrainNets:
    """What one training step works on: the (possibly DDP/compile-wrapped) networks, their
    optimizers and the configs. D and opt_d are None for families without a discriminator."""
    G: nn.Module
    D: nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    model: Any  # aigc_ray.config.ModelConfig (its .opts is this family's Options)
    train: Any  # aigc_ray.config.TrainConfig
    progress: float = 0.0  # the fraction of training done when this epoch began, in [0, 1)


class ModelFamily:
    """Subclass, set the class attributes, implement ``build`` and ``train_step``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line for --help and error messages."""
    Options: ClassVar[type] = NoOptions
    """A dataclass of the family's own settings (``model.options`` in a config): a docstring per
    field, checked in ``__post_init__``. Its defaults are the only copy of those defaults."""
    capabilities: ClassVar[Capabilities]
    train_metrics: ClassVar[frozenset[str]]
    """Keys of the dict ``train_step`` returns (averaged per epoch and reported)."""
    pbt_mutable_options: ClassVar[frozenset[str]] = frozenset()
    """Options PBT may change mid-run: those that leave every weight's name and shape alone."""

    # --- what the rest of the code asks -------------------------------------------------
    @property
    def train_keys(self) -> frozenset[str]:
        """Train settings beyond the ones every family uses."""
        return frozenset({"lr_d", "critic_steps"}) if self.capabilities.adversarial else frozenset()

    def train_keys_for(self, model_cfg) -> frozenset[str]:
        """train_keys for this model config: a family whose discriminator is optional (the VAE's
        adversarial term) takes train.lr_d only when it has one."""
        return self.train_keys

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))

    def check(self, model_cfg) -> None:
        """Raise ConfigError for settings that are valid one by one but not together (e.g. an
        option that needs model.num_classes). Called by ModelConfig, before anything is built."""

    def needs_double_backward(self, model_cfg) -> bool:
        """True when D's loss differentiates through D's input gradient (gradient penalty, R1):
        such a D is left out of torch.compile."""
        return False

    # --- networks -----------------------------------------------------------------------
    def build(self, model_cfg) -> tuple[nn.Module, nn.Module | None]:
        """(the served module, the discriminator or None). The served module is what is trained,
        EMA-averaged, checkpointed and served: a GAN's generator, or a whole VAE/AE."""
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------
    def train_step(self, nets: TrainNets, real: torch.Tensor, labels: torch.Tensor | None, ctx,
                   update_g: bool) -> dict[str, torch.Tensor]:
        """One optimisation step. real: (N, C, S, S) in [-1, 1]; labels: (N,) int64 or None;
        ctx: steps.StepContext; update_g: also update the generator this batch (adversarial
        families update D every batch and G every train.critic_steps). Returns detached scalar
        tensors named as in ``train_metrics`` (no device sync)."""
        raise NotImplementedError

    def step_phase(self, model_cfg, progress: float) -> Any:
        """What ``train_step`` does differently at ``progress`` (TrainNets.progress), as a hashable
        value: a captured CUDA-graph step is reused only within one phase. Default: one phase."""
        return None

    def fit_to_data(self, model: nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                    all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Before each checkpoint: fit what the served ``model`` derives from the training data (a VAE's
        sampling prior) to that model itself. ``batches()`` iterates this worker's shard as (uint8
        (N, C, S, S), int64 (N,)); ``all_reduce`` sums a tensor over the workers in place (every worker
        calls this at the same point). Default: nothing to fit."""

    # --- inference ----------------------------------------------------------------------
    def sample(self, model: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Latents (N, latent_dim) [+ labels (N,)] -> images (N, C, S, S) in [-1, 1]."""
        if not self.capabilities.generate:
            raise ValueError(f"model family {self.name!r} cannot generate: it has no prior to sample from")
        return model(z, labels)

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> the encoder's mean (N, latent_dim)."""
        raise ValueError(f"model family {self.name!r} has no encoder: it cannot encode")

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> reconstructions in [-1, 1] (through the encoder's mean)."""
        raise ValueError(f"model family {self.name!r} has no encoder: it cannot reconstruct")


_FAMILIES: dict[str, ModelFamily] = {}


class UnknownFamilyError(ValueError):
    """A family name that is not registered; the message lists the registered ones."""


def register(family_cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family available by its name."""
    if family_cls.name in _FAMILIES:
        raise ValueError(f"model family {family_cls.name!r} is registered twice")
    _FAMILIES[family_cls.name] = family_cls()
    return family_cls


def get_family(name: str) -> ModelFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(f"model.family={name!r} is not a registered model family; "
                                 f"registered: {', '.join(family_names())}") from None


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def families_accepting(option: str) -> list[str]:
    """Names of the families whose options include ``option`` (for error messages)."""
    return [f.name for f in _FAMILIES.values() if option in f.option_names]
