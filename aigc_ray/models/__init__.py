"""Plain torch models, one file per family. Nothing here imports Ray.

``build_generator`` returns the module that is trained, EMA-averaged, checkpointed and
served: a GAN generator, or the whole VAE/AE (its decoder generates, its encoder
reconstructs). ``build_discriminator`` returns the GAN's discriminator/critic or None.
"""

from __future__ import annotations

from torch import nn

from aigc_ray.models.dcgan import DCGANDiscriminator, DCGANGenerator
from aigc_ray.models.seed_recipe import SeedRecipeDiscriminator, SeedRecipeGenerator
from aigc_ray.models.vae import VAE

__all__ = ["build_generator", "build_discriminator", "DCGANGenerator", "DCGANDiscriminator", "VAE"]


def build_generator(cfg) -> nn.Module:
    """cfg: aigc_ray.config.ModelConfig (duck-typed so this file needs no config import)."""
    if cfg.family in ("dcgan", "wgan-gp"):
        return DCGANGenerator(cfg.image_size, cfg.channels, cfg.latent_dim, cfg.width, cfg.num_classes)
    if cfg.family == "seed-recipe":
        return SeedRecipeGenerator(cfg.image_size, cfg.channels, cfg.latent_dim)
    if cfg.family in ("vae", "ae"):
        return VAE(cfg.image_size, cfg.channels, cfg.latent_dim, cfg.width, variational=cfg.family == "vae")
    raise ValueError(f"unknown model family {cfg.family!r}")


def build_discriminator(cfg) -> nn.Module | None:
    if cfg.family == "dcgan":
        return DCGANDiscriminator(cfg.image_size, cfg.channels, cfg.width, cfg.num_classes, norm="batch")
    if cfg.family == "wgan-gp":
        return DCGANDiscriminator(cfg.image_size, cfg.channels, cfg.width, cfg.num_classes, norm="layer")
    if cfg.family == "seed-recipe":
        return SeedRecipeDiscriminator(cfg.image_size, cfg.channels)
    return None
