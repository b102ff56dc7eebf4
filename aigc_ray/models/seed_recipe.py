"""The `seed-recipe` family, a baseline: the TensorFlow-tutorial DCGAN, kept to measure against.

For 28x28 it is: G: dense 7x7x256, BN, LeakyReLU, deconv 128 s1, deconv 64 s2, deconv 1 s2
tanh; D: conv 64 s2, conv 128 s2 (LeakyReLU, dropout 0.3 after each), dense 1. Here the
start side is image_size / 4 so the same recipe builds for every supported size.
"""

from __future__ import annotations

import torch
from torch import nn

from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.steps import gan_step


class SeedRecipeGenerator(nn.Module):
    def __init__(self, image_size: int, channels: int, latent_dim: int, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.start = image_size // 4
        self.project = nn.Sequential(
            nn.Linear(latent_dim, self.start * self.start * 256, bias=False),
            nn.BatchNorm1d(self.start * self.start * 256), nn.LeakyReLU(0.3))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 5, 1, 2, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.3),
            nn.ConvTranspose2d(128, 64, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.3),
            nn.ConvTranspose2d(64, channels, 5, 2, 2, output_padding=1, bias=False), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(z).view(-1, 256, self.start, self.start)
        return self.net(h)  # (N, C, S, S)


class SeedRecipeDiscriminator(nn.Module):
    def __init__(self, image_size: int, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 64, 5, 2, 2), nn.LeakyReLU(0.3), nn.Dropout(0.3),
            nn.Conv2d(64, 128, 5, 2, 2), nn.LeakyReLU(0.3), nn.Dropout(0.3),
            nn.Flatten(), nn.Linear(128 * (image_size // 4) ** 2, 1))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images).squeeze(1)  # logits (N,)


@register
class SeedRecipe(ModelFamily):
    name = "seed-recipe"
    summary = "the TensorFlow-tutorial DCGAN of the source documents, kept as the baseline to beat"
    capabilities = Capabilities(generate=True, reconstruct=False, conditional=False, adversarial=True)
    train_metrics = frozenset({"loss_d", "loss_g", "d_real", "d_fake"})

    def build(self, m) -> tuple[nn.Module, nn.Module]:
        return SeedRecipeGenerator(m.image_size, m.channels, m.latent_dim), SeedRecipeDiscriminator(m.image_size, m.channels)

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        return gan_step(nets.G, nets.D, nets.opt_g, nets.opt_d, real, None, nets.model.latent_dim, ctx, update_g)
