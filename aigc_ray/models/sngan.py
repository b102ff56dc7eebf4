"""The `sngan` family: the small-data GAN recipe.

The DCGAN generator against a spectrally normalised discriminator without BatchNorm (Miyato et
al. 2018), trained with the hinge loss, DiffAugment on every image D sees (real and fake, in both
steps; Zhao et al. 2020), an optional R1 penalty on the real images (Mescheder et al. 2018), and
TTUR through train.lr_d / train.lr_g (Heusel et al. 2017). The generator's EMA with warm-up is
the engine's (train.ema_decay), as for every family.

Why a family of its own rather than options of `dcgan`: its discriminator is a different network
(spectral-norm parametrised weights, no BatchNorm: other weight names, so a checkpoint of one
can't load as the other) trained with a different loss, and R1 changes what the engine must do
(double backward keeps D out of torch.compile); as options of dcgan these would be three
switches that only make sense together.

D: (N, C, S, S) [+ labels (N,)] -> logits (N,): dcgan's discriminator layout (one 4x4 stride-2
conv per halving of the side, LeakyReLU(0.2), a linear head on the 4x4 features; class-conditional
through the projection discriminator) with every weight spectrally normalised and no BatchNorm.
(SNGAN's deeper D, a 3x3 conv before each stride-2 one, costs 8x the compute here on a CPU.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from aigc_ray.config import ConfigError
from aigc_ray.models.dcgan import DCGANDiscriminator, DCGANGenerator, _channels, num_upsamplings
from aigc_ray.models.diffaugment import check_policy, parse_policy
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.steps import hinge_step


class SNDiscriminator(nn.Module):
    def __init__(self, image_size: int, channels: int, width: int, num_classes: int = 0):
        super().__init__()
        n_down = num_upsamplings(image_size)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        for level in range(1, n_down):
            c_in, c_out = _channels(width, level - 1), _channels(width, level)
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers, nn.Flatten())  # (N, top * 4 * 4)
        feat_dim = _channels(width, n_down - 1) * 16
        self.head = spectral_norm(nn.Linear(feat_dim, 1))
        self.label_projection = spectral_norm(nn.Embedding(num_classes, feat_dim)) if num_classes else None

    # the same projection-discriminator head as DCGAN's: logit = head(h) + <embed(y), h>
    forward = DCGANDiscriminator.forward


@dataclass
class SNGANOptions:
    diffaugment: str = "translation,cutout,color"
    """DiffAugment ops applied to real and fake images before D, comma-separated, from
    translation, cutout, color; "" turns it off."""
    r1_gamma: float = 0.0
    """Weight gamma of the R1 penalty gamma/2 * E||grad D(x)||^2 on real images; 0 turns it off
    (then D may be torch.compiled)."""

    def __post_init__(self) -> None:
        check_policy(self.diffaugment)
        if not (isinstance(self.r1_gamma, (int, float)) and self.r1_gamma >= 0):
            raise ConfigError(f"model.options.r1_gamma must be a number >= 0, got {self.r1_gamma!r}")


@register
class SNGAN(ModelFamily):
    name = "sngan"
    summary = "small-data GAN: spectral-norm D, hinge loss, DiffAugment, optional R1; TTUR via train.lr_d"
    Options = SNGANOptions
    capabilities = Capabilities(generate=True, reconstruct=False, conditional=True, adversarial=True)
    train_metrics = frozenset({"loss_d", "loss_g", "d_real", "d_fake", "r1"})
    pbt_mutable_options = frozenset({"diffaugment"})  # not r1_gamma: it decides whether D is compiled

    def needs_double_backward(self, model_cfg) -> bool:
        return model_cfg.opts.r1_gamma > 0

    def build(self, m) -> tuple[nn.Module, nn.Module]:
        D = SNDiscriminator(m.image_size, m.channels, m.width, m.num_classes)
        return DCGANGenerator(m.image_size, m.channels, m.latent_dim, m.width, m.num_classes), D

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        o = nets.model.opts
        return hinge_step(nets.G, nets.D, nets.opt_g, nets.opt_d, real, labels, nets.model.latent_dim, ctx, update_g,
                          parse_policy(o.diffaugment), o.r1_gamma)

