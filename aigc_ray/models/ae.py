"""The `ae` family: the plain autoencoder (reconstruction only, for compression and denoising).

The VAE's encoder and decoder without the KL term; with no prior it cannot generate, so its
sample grids, evaluation and serving use reconstructions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc_ray.models.registry import Capabilities, TrainNets, register
from aigc_ray.models.steps import vae_step
from aigc_ray.models.vae import VAE, _AutoencoderFamily, check_recon_loss


@dataclass
class AEOptions:
    recon_loss: str = "bce"
    """Reconstruction loss: bce (on [0,1] pixels) or mse."""

    def __post_init__(self) -> None:
        check_recon_loss(self.recon_loss, ("bce", "mse"))


@register
class AutoencoderFamily(_AutoencoderFamily):
    name = "ae"
    summary = "plain convolutional autoencoder (reconstruction only: no sampling)"
    Options = AEOptions
    capabilities = Capabilities(generate=False, reconstruct=True, conditional=False, adversarial=False)
    train_metrics = frozenset({"loss", "recon", "kl"})

    def build(self, m) -> tuple[nn.Module, None]:
        return VAE(m.image_size, m.channels, m.latent_dim, m.width, variational=False), None

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        return vae_step(nets.G, nets.opt_g, real, ctx, 0.0, nets.model.opts.recon_loss, variational=False)
