"""Convolutional VAE and plain autoencoder.

Encoder: (N, C, S, S) -> (N, width*2^k, 4, 4) -> mu, logvar (N, latent_dim) (the AE uses
mu only). Decoder: z (N, latent_dim) -> pixel logits (N, C, S, S); ``decode`` returns
images in [-1, 1]. Loss terms live in aigc_ray.train.steps.
"""

from __future__ import annotations

import torch
from torch import nn

from aigc_ray.models.dcgan import _channels, init_weights, num_upsamplings


class Encoder(nn.Module):
    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, variational: bool):
        super().__init__()
        n_down = num_upsamplings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for level in range(1, n_down):
            c_in, c_out = _channels(width, level - 1), _channels(width, level)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        self.net = nn.Sequential(*layers, nn.Flatten())
        feat_dim = _channels(width, n_down - 1) * 16
        self.to_stats = nn.Linear(feat_dim, latent_dim * (2 if variational else 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_stats(self.net(images))


class Decoder(nn.Module):
    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int):
        super().__init__()
        n_up = num_upsamplings(image_size)
        top = _channels(width, n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, top, 4, 1, 0, bias=False), nn.BatchNorm2d(top), nn.ReLU(True)]
        for level in range(n_up - 1, 0, -1):
            c_in, c_out = _channels(width, level), _channels(width, level - 1)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers.append(nn.ConvTranspose2d(_channels(width, 0), channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])  # logits (N, C, S, S)


class VAE(nn.Module):
    """``variational=False`` gives the plain autoencoder (reconstruction only, no prior)."""

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, variational: bool = True):
        super().__init__()
        self.latent_dim, self.variational, self.num_classes = latent_dim, variational, 0
        self.encoder = Encoder(image_size, channels, latent_dim, width, variational)
        self.decoder = Decoder(image_size, channels, latent_dim, width)
        init_weights(self)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar); logvar is zeros for the plain autoencoder."""
        stats = self.encoder(images)
        if not self.variational:
            return stats, torch.zeros_like(stats)
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z)) * 2 - 1  # logits -> [-1, 1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (reconstruction logits, mu, logvar); z is sampled by reparameterisation."""
        mu, logvar = self.encode(images)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.variational else mu
        return self.decode_logits(z), mu, logvar
