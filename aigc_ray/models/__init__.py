"""Plain torch models, one module per model family. Nothing here imports Ray.

Importing this package registers every shipped family (registry.py). ``get_family(name)``
returns the object that owns a family's networks, training step, sampling and settings;
``build_generator`` / ``build_discriminator`` are shorthands for its ``build``.
"""

from __future__ import annotations

from torch import nn

# each import registers its family
from aigc_ray.models import ae, dcgan, seed_recipe, sngan, vae, wgan_gp  # noqa: F401, I001
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, family_names, get_family, register

__all__ = ["Capabilities", "ModelFamily", "TrainNets", "build_discriminator", "build_generator", "family_names",
           "get_family", "register"]


def build_generator(cfg) -> nn.Module:
    """The served module of ``cfg.family`` (cfg: aigc_ray.config.ModelConfig)."""
    return get_family(cfg.family).build(cfg)[0]


def build_discriminator(cfg) -> nn.Module | None:
    return get_family(cfg.family).build(cfg)[1]
