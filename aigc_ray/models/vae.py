"""The `vae` family: a convolutional VAE (the plain autoencoder, family `ae`, reuses it).

Encoder: (N, C, S, S) -> (N, width*2^k, 4, 4) -> mu, logvar (N, latent_dim) (the AE uses
mu only). Decoder: z (N, latent_dim) -> pixel logits (N, C, S, S); ``decode`` returns
images in [-1, 1]. Loss terms live in aigc_ray.train.steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc_ray.config import ConfigError
from aigc_ray.models.dcgan import _channels, init_weights, num_upsamplings
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.steps import vae_step

RECON_LOSSES = ("bce", "mse", "sigma")
PRIORS = ("standard", "fitted", "mixture")
PRIOR_MOMENTUM = 0.02  # per training batch: the fitted prior averages over the last ~50 batches


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
    """``variational=False`` gives the plain autoencoder (reconstruction only, no prior).

    ``fitted_prior``: sample from a full-covariance Gaussian fitted to the aggregate posterior
    q(z) = E_x q(z|x) instead of N(0, I) (an ex-post density estimate, cf. Ghosh et al. 2020):
    the regions of N(0, I) no training image encodes to decode to blurs. Its moments are running
    averages over training batches, kept as buffers (like BatchNorm's running statistics):
    prior_mean (latent_dim,), prior_cov and its Cholesky factor prior_scale (latent_dim, latent_dim).
    ``sample(z)`` maps standard-normal latents through them, so seeds stay seeds.

    ``mixture_components`` K > 0 (instead of fitted_prior): a mixture of K full-covariance Gaussians
    instead of one, fitted by online hard EM (each encoded batch assigned to its nearest component,
    exponentially decayed sufficient statistics): the digits' aggregate posterior has a mode per
    class, and one Gaussian puts its mass between them, where decodes are hybrids. Buffers
    mix_count (K,), mix_sum (K, d), mix_outer (K, d, d), mix_scale (K, d, d). A latent row picks
    its component from the fractional part of 1000 |z_0| (uniform to ~1e-3 and independent of the
    row's Gaussian shape), so one seed still gives one image and the graph exports to ONNX.
    """

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, variational: bool = True,
                 fitted_prior: bool = False, mixture_components: int = 0):
        super().__init__()
        self.latent_dim, self.variational, self.num_classes = latent_dim, variational, 0
        self.fitted_prior = fitted_prior and not mixture_components
        self.mixture_components = mixture_components
        self.encoder = Encoder(image_size, channels, latent_dim, width, variational)
        self.decoder = Decoder(image_size, channels, latent_dim, width)
        if self.fitted_prior:
            self.register_buffer("prior_mean", torch.zeros(latent_dim))
            self.register_buffer("prior_cov", torch.eye(latent_dim))
            self.register_buffer("prior_scale", torch.eye(latent_dim))
        if mixture_components:
            k = mixture_components
            self.register_buffer("mix_count", torch.zeros(k))
            self.register_buffer("mix_sum", torch.zeros(k, latent_dim))
            self.register_buffer("mix_outer", torch.zeros(k, latent_dim, latent_dim))
            self.register_buffer("mix_scale", torch.eye(latent_dim).repeat(k, 1, 1))
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

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Standard-normal latents (N, latent_dim) -> images in [-1, 1], through the fitted prior if any."""
        if self.fitted_prior:
            z = self.prior_mean + z @ self.prior_scale.T
        elif self.mixture_components:
            z = self._mixture_latents(z)
        return self.decode(z)

    def _mixture_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Standard-normal (N, d) -> samples of the fitted mixture (N, d)."""
        count = self.mix_count.clamp_min(1e-8)
        weights = count / count.sum()  # (K,)
        scaled = z[:, :1].abs() * 1000
        u = scaled - torch.floor(scaled)  # (N, 1) ~ U(0, 1); not torch.frac, which ONNX lacks
        component = (u > torch.cumsum(weights, 0)[None, :-1]).sum(1)  # (N,) in 0..K-1
        mean = self.mix_sum[component] / count[component, None]  # (N, d)
        scale = self.mix_scale[component]  # (N, d, d)
        return mean + (scale @ z[:, :, None])[:, :, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (reconstruction logits, mu, logvar); z is sampled by reparameterisation."""
        mu, logvar = self.encode(images)
        if self.fitted_prior and self.training:
            self._track_prior(mu.detach().float(), logvar.detach().float())
        elif self.mixture_components and self.training:
            self._track_mixture(mu.detach().float(), logvar.detach().float())
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.variational else mu
        return self.decode_logits(z), mu, logvar

    @torch.no_grad()
    def _track_prior(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Moment-match the batch's aggregate posterior: mean E[mu], covariance Cov(mu) + E[diag(var)].
        No host sync (cholesky_ex), so the step stays capturable as a CUDA graph."""
        mean = mu.mean(0)
        centred = mu - mean
        cov = centred.T @ centred / max(mu.shape[0] - 1, 1) + torch.diag(logvar.exp().mean(0))
        self.prior_mean.lerp_(mean, PRIOR_MOMENTUM)
        self.prior_cov.lerp_(cov, PRIOR_MOMENTUM)
        eye = torch.eye(self.latent_dim, device=mu.device)
        scale, info = torch.linalg.cholesky_ex(self.prior_cov + 1e-5 * eye)
        self.prior_scale.copy_(torch.where(info == 0, scale, self.prior_scale))


    @torch.no_grad()
    def _track_mixture(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """One online hard-EM step on the batch's posterior means mu (N, d). No host sync."""
        k, d = self.mixture_components, self.latent_dim
        count = self.mix_count.clamp_min(1e-8)
        means = self.mix_sum / count[:, None]  # (K, d)
        # an empty component (at the start, or one that lost its points) takes a batch point
        seeds = mu[torch.arange(k, device=mu.device) % mu.shape[0]]
        means = torch.where((self.mix_count < 1e-3)[:, None], seeds, means)
        assign = torch.cdist(mu, means).argmin(1)  # (N,)
        onehot = torch.nn.functional.one_hot(assign, k).float()  # (N, K)
        var = logvar.exp()
        n_k = onehot.sum(0)  # (K,)
        s1 = onehot.T @ mu  # (K, d)
        s2 = torch.einsum("nk,ni,nj->kij", onehot, mu, mu) + torch.diag_embed(onehot.T @ var)  # (K, d, d)
        keep = 1 - PRIOR_MOMENTUM
        self.mix_count.mul_(keep).add_(n_k)
        self.mix_sum.mul_(keep).add_(s1)
        self.mix_outer.mul_(keep).add_(s2)
        count = self.mix_count.clamp_min(1e-8)
        mean = self.mix_sum / count[:, None]
        cov = self.mix_outer / count[:, None, None] - mean[:, :, None] * mean[:, None, :]
        eye = torch.eye(d, device=mu.device)
        scale, info = torch.linalg.cholesky_ex(cov + 1e-4 * eye)
        self.mix_scale.copy_(torch.where((info == 0)[:, None, None], scale, self.mix_scale))


def check_recon_loss(value: str, allowed: tuple[str, ...] = RECON_LOSSES) -> None:
    if value not in allowed:
        raise ConfigError(f"model.options.recon_loss={value!r} is unknown; use one of {allowed}")


@dataclass
class VAEOptions:
    beta: float = 1.0
    """Weight of the KL term in the ELBO (beta-VAE; 1 is the plain ELBO)."""
    recon_loss: str = "bce"
    """Reconstruction likelihood: bce (Bernoulli on [0,1] pixels), mse (Gaussian, fixed variance)
    or sigma (Gaussian with a learned variance shared by all pixels, set to its optimum, the
    batch's mean squared error: the sigma-VAE of Rybkin et al. 2021, which balances the
    reconstruction against the KL term by itself)."""
    prior: str = "standard"
    """What samples are drawn from: standard (N(0, I)), fitted (a full-covariance Gaussian
    fitted to the encoded training images during training) or mixture (a mixture of
    mixture_components such Gaussians; see VAE)."""
    mixture_components: int = 10
    """Components of the mixture prior (prior: mixture only)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ConfigError(f"model.options.beta must be a number >= 0, got {self.beta!r}")
        check_recon_loss(self.recon_loss)
        if self.prior not in PRIORS:
            raise ConfigError(f"model.options.prior={self.prior!r} is unknown; use one of {PRIORS}")
        if not (isinstance(self.mixture_components, int) and 1 <= self.mixture_components <= 64):
            raise ConfigError(f"model.options.mixture_components must be an integer in 1..64, "
                              f"got {self.mixture_components!r}")


class _AutoencoderFamily(ModelFamily):
    """What the VAE and the plain AE share: one module that encodes and decodes."""

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode(images)[0]

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.decode(self.encode(model, images))


@register
class VAEFamily(_AutoencoderFamily):
    name = "vae"
    summary = "convolutional beta-VAE: negative ELBO with the closed-form Gaussian KL"
    Options = VAEOptions
    capabilities = Capabilities(generate=True, reconstruct=True, conditional=False, adversarial=False)
    train_metrics = frozenset({"loss", "recon", "kl"})
    pbt_mutable_options = frozenset({"beta"})

    def build(self, m) -> tuple[nn.Module, None]:
        o = m.opts
        return VAE(m.image_size, m.channels, m.latent_dim, m.width, variational=True,
                   fitted_prior=o.prior == "fitted",
                   mixture_components=o.mixture_components if o.prior == "mixture" else 0), None

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        o = nets.model.opts
        return vae_step(nets.G, nets.opt_g, real, ctx, o.beta, o.recon_loss, variational=True)

    def sample(self, model: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return model.sample(z)
