"""The `dcgan` family: DCGAN generator and discriminator for any power-of-two image size (8..128).

Plain torch. The generator maps z (N, latent_dim) [+ label (N,)] to images (N, C, S, S)
in [-1, 1]; the discriminator maps images [+ labels] to one logit per image (N,).
Class conditioning: the label embedding is concatenated to z in G, and D uses the
projection discriminator (Miyato & Koyama 2018): logit = linear(h) + <embed(y), h>.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from aigc_ray.models.diffaugment import check_policy, parse_policy
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.steps import gan_step


def num_upsamplings(image_size: int) -> int:
    """Stride-2 layers between 4x4 and image_size (8 -> 1, ..., 128 -> 5)."""
    return int(math.log2(image_size)) - 2


def _channels(width: int, level: int) -> int:
    return width * min(2**level, 8)


class DCGANGenerator(nn.Module):
    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, num_classes: int = 0):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        n_up = num_upsamplings(image_size)
        self.label_embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        top = _channels(width, n_up - 1)
        # z (N, in_dim, 1, 1) -> (N, top, 4, 4)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, top, 4, 1, 0, bias=False), nn.BatchNorm2d(top), nn.ReLU(True)]
        for level in range(n_up - 1, 0, -1):  # each block doubles the side and halves channels
            c_in, c_out = _channels(width, level), _channels(width, level - 1)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(_channels(width, 0), channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: pass labels")
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """norm="batch" for DCGAN; norm="layer" (GroupNorm with one group) for a WGAN-GP critic,
    whose gradient penalty is per-sample and so must not mix samples through BatchNorm."""

    def __init__(self, image_size: int, channels: int, width: int, num_classes: int = 0, norm: str = "batch"):
        super().__init__()
        n_down = num_upsamplings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for level in range(1, n_down):
            c_in, c_out = _channels(width, level - 1), _channels(width, level)
            norm_layer = nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(1, c_out)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), norm_layer, nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (N, top * 4 * 4)
        feat_dim = _channels(width, n_down - 1) * 16
        self.head = nn.Linear(feat_dim, 1)
        self.label_projection = nn.Embedding(num_classes, feat_dim) if num_classes else None
        init_weights(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(images)
        logits = self.head(h).squeeze(1)
        if self.label_projection is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            logits = logits + (self.label_projection(labels) * h).sum(dim=1)
        return logits


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@dataclass
class DCGANOptions:
    diffaugment: str = "translation,cutout,color"
    """DiffAugment ops applied to real and fake images before D (aigc_ray/models/diffaugment.py),
    comma-separated, from translation, cutout, color; "" turns it off."""

    def __post_init__(self) -> None:
        check_policy(self.diffaugment)


@register
class DCGAN(ModelFamily):
    name = "dcgan"
    summary = "DCGAN, non-saturating loss on logits; optionally class-conditional (projection D)"
    Options = DCGANOptions
    capabilities = Capabilities(generate=True, reconstruct=False, conditional=True, adversarial=True)
    train_metrics = frozenset({"loss_d", "loss_g", "d_real", "d_fake"})
    pbt_mutable_options = frozenset({"diffaugment"})

    def build(self, m) -> tuple[nn.Module, nn.Module]:
        return (DCGANGenerator(m.image_size, m.channels, m.latent_dim, m.width, m.num_classes),
                DCGANDiscriminator(m.image_size, m.channels, m.width, m.num_classes, norm="batch"))

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        return gan_step(nets.G, nets.D, nets.opt_g, nets.opt_d, real, labels, nets.model.latent_dim, ctx, update_g,
                        parse_policy(nets.model.opts.diffaugment))
