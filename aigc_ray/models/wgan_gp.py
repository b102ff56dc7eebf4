"""The `wgan-gp` family: the DCGAN generator against a critic without BatchNorm, trained with the
Wasserstein loss and a gradient penalty (Gulrajani et al. 2017). The seeds name gradient penalty
as the remedy for mode collapse."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc_ray.config import ConfigError
from aigc_ray.models.dcgan import DCGANDiscriminator, DCGANGenerator
from aigc_ray.models.diffaugment import check_policy, parse_policy
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.steps import wgan_gp_step


@dataclass
class WGANGPOptions:
    gp_weight: float = 10.0
    """Weight (lambda) of the gradient penalty E[(||grad D(x_hat)||_2 - 1)^2]."""
    diffaugment: str = "translation,cutout,color"
    """DiffAugment ops applied to real and fake images before the critic, comma-separated, from
    translation, cutout, color; "" turns it off."""

    def __post_init__(self) -> None:
        check_policy(self.diffaugment)
        if not (isinstance(self.gp_weight, (int, float)) and self.gp_weight >= 0):
            raise ConfigError(f"model.options.gp_weight must be a number >= 0, got {self.gp_weight!r}")


@register
class WGANGP(ModelFamily):
    name = "wgan-gp"
    summary = "WGAN-GP: DCGAN generator, LayerNorm critic, Wasserstein loss + gradient penalty"
    Options = WGANGPOptions
    capabilities = Capabilities(generate=True, reconstruct=False, conditional=True, adversarial=True)
    train_metrics = frozenset({"loss_d", "loss_g", "d_real", "d_fake", "gp"})
    pbt_mutable_options = frozenset({"gp_weight", "diffaugment"})

    def needs_double_backward(self, model_cfg) -> bool:
        return True

    def build(self, m) -> tuple[nn.Module, nn.Module]:
        # norm="layer": the penalty is per sample, so the critic must not mix samples (no BatchNorm)
        return (DCGANGenerator(m.image_size, m.channels, m.latent_dim, m.width, m.num_classes),
                DCGANDiscriminator(m.image_size, m.channels, m.width, m.num_classes, norm="layer"))

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        return wgan_gp_step(nets.G, nets.D, nets.opt_g, nets.opt_d, real, labels, nets.model.latent_dim, ctx,
                            nets.model.opts.gp_weight, update_g, parse_policy(nets.model.opts.diffaugment))
