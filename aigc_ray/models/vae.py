"""The `vae` family: a convolutional VAE (the plain autoencoder, family `ae`, reuses it).

Encoder: (N, C, S, S) -> (N, width*2^k, 4, 4) -> mu, logvar (N, latent_dim) (the AE uses
mu only). Decoder: z (N, latent_dim) [++ one-hot class (N, num_classes)] -> pixel logits
(N, C, S, S); ``decode`` returns images in [-1, 1]. Loss terms live in aigc_ray.train.steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc_ray.config import ConfigError
from aigc_ray.models.dcgan import _channels, init_weights, num_upsamplings
from aigc_ray.models.registry import Capabilities, ModelFamily, TrainNets, register
from aigc_ray.models.sngan import SNDiscriminator
from aigc_ray.models.steps import vae_adversarial_step, vae_step

RECON_LOSSES = ("bce", "mse", "sigma")
MAX_MIXTURE_FLOATS = 2**25  # mix_outer and mix_scale, (C*K, d, d) each: 128 MiB apiece at most
PRIORS = ("standard", "fitted", "mixture")
PRIOR_MOMENTUM = 0.02  # per training batch: the fitted prior averages over the last ~50 batches
PRIOR_REFIT_ITERATIONS = 10  # hard-EM passes over the shard's encodings when a checkpoint is written
ADVERSARIAL_FAKES = ("reconstructions", "samples")  # what that discriminator is shown as fake
ADVERSARIAL_AUGMENT = ("translation",)  # what the adversarial term's discriminator sees real and fake through


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
        """``latent_dim`` counts every input feature (a conditional VAE's one-hot class included)."""
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

    ``num_classes`` C > 0: class-conditional. The decoder reads the class as a one-hot vector
    beside z, and the mixture has K components per class (C*K in all, class c owning components
    c*K .. c*K+K-1), each fitted to the encodings of its class's images only; a sample draws a
    component of the class it is asked for. The encoder does not see the class, so reconstruction
    needs none: it decodes the encoding with every class and keeps the decode nearest the image
    (the class of the encoding's nearest mixture component was right for only 62% of the shapes
    test images: the class is the decoder's input, so the encodings need not separate by it). Why: an unconditional
    mixture's samples fall between classes (hybrid shapes); per class, the encodings are far
    simpler to fit (shapes, 2,400 steps: 52x the FID floor unconditional, 2-3x conditional).
    """

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, variational: bool = True,
                 fitted_prior: bool = False, mixture_components: int = 0, num_classes: int = 0,
                 chroma_gain: float = 1.0):
        super().__init__()
        self.chroma_gain = chroma_gain if channels == 3 else 1.0
        if self.chroma_gain != 1.0:
            # opponent colour (luminance, red-green, yellow-blue; orthonormal), chroma scaled by the gain
            opponent = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
            opponent = opponent / opponent.norm(dim=1, keepdim=True)
            gain = torch.tensor([1.0, chroma_gain, chroma_gain])
            self.register_buffer("colour_in", gain[:, None] * opponent, persistent=False)  # RGB -> encoder input
            self.register_buffer("colour_out", opponent.T * gain[None, :], persistent=False)  # decoder output -> RGB
        self.latent_dim, self.variational, self.num_classes = latent_dim, variational, num_classes
        self.fitted_prior = fitted_prior and not mixture_components
        self.mixture_components = mixture_components
        self.encoder = Encoder(image_size, channels, latent_dim, width, variational)
        self.decoder = Decoder(image_size, channels, latent_dim + num_classes, width)
        if num_classes:
            # one-hot codes, scaled to about the encodings' spread (their std is ~2); not saved
            self.register_buffer("class_codes", 2.0 * torch.eye(num_classes), persistent=False)
        if self.fitted_prior:
            self.register_buffer("prior_mean", torch.zeros(latent_dim))
            self.register_buffer("prior_cov", torch.eye(latent_dim))
            self.register_buffer("prior_scale", torch.eye(latent_dim))
        if mixture_components:
            k = mixture_components * max(num_classes, 1)
            self.register_buffer("mix_count", torch.zeros(k))
            self.register_buffer("mix_sum", torch.zeros(k, latent_dim))
            self.register_buffer("mix_outer", torch.zeros(k, latent_dim, latent_dim))
            self.register_buffer("mix_scale", torch.eye(latent_dim).repeat(k, 1, 1))
        init_weights(self)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar); logvar is zeros for the plain autoencoder."""
        if self.chroma_gain != 1.0:
            images = torch.einsum("oc,nchw->nohw", self.colour_in, images)
        stats = self.encoder(images)
        if not self.variational:
            return stats, torch.zeros_like(stats)
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if labels is None:
                raise ValueError("this VAE is class-conditional: decoding needs labels")
            z = torch.cat([z, self.class_codes[labels]], 1)  # (N, latent_dim + num_classes)
        logits = self.decoder(z)
        if self.chroma_gain != 1.0:
            logits = torch.einsum("co,nohw->nchw", self.colour_out, logits)
        return logits

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, labels)) * 2 - 1  # logits -> [-1, 1]

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> images through the encoder's mean; if conditional,
        decoded with the class that reproduces each image best."""
        mu = self.encode(images)[0]
        if not self.num_classes:
            return self.decode(mu)
        decoded = self.decode_every_class(mu)  # (N, classes, C, S, S)
        error = (decoded - images[:, None]).pow(2).flatten(2).mean(2)  # (N, classes)
        rows = torch.arange(mu.shape[0], device=mu.device)
        return decoded[rows, error.argmin(1)]

    def decode_every_class(self, z: torch.Tensor) -> torch.Tensor:
        """(N, d) latents -> (N, num_classes, C, S, S): each row decoded as every class."""
        n, k = z.shape[0], self.num_classes
        labels = torch.arange(k, device=z.device).repeat(n)  # (N*k,): 0..k-1 per row
        decoded = self.decode(z.repeat_interleave(k, 0), labels)
        return decoded.view(n, k, *decoded.shape[1:])

    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal latents (N, latent_dim) [+ labels (N,)] -> images in [-1, 1], through the
        fitted prior if any."""
        return self.decode(self.prior_latents(z, labels), labels)

    def prior_latents(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal (N, latent_dim) [+ labels (N,)] -> draws of the sampling prior (N, latent_dim):
        the fitted Gaussian, the mixture (of the labels' classes), or z itself."""
        if self.fitted_prior:
            return self.prior_mean + z @ self.prior_scale.T
        if self.mixture_components:
            return self._mixture_latents(z, labels)
        return z

    def _classes(self, labels: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """(N,) each row's class: the labels when conditional, else 0 (the one class of the mixture)."""
        if self.num_classes:
            return labels
        return torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)

    def _mixture_latents(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal (N, d) [+ labels (N,)] -> samples of the fitted mixture (of the labels'
        classes) (N, d)."""
        k = self.mixture_components
        count = self.mix_count.clamp_min(1e-8)
        per_class = count.view(-1, k)  # (C, K); C = 1 when unconditional
        weights = per_class / per_class.sum(1, keepdim=True)
        cls = self._classes(labels, z)
        scaled = z[:, :1].abs() * 1000
        u = scaled - torch.floor(scaled)  # (N, 1) ~ U(0, 1); not torch.frac, which ONNX lacks
        within = (u > torch.cumsum(weights, 1)[cls][:, :-1]).sum(1)  # (N,) in 0..K-1
        component = cls * k + within
        mean = self.mix_sum[component] / count[component, None]  # (N, d)
        scale = self.mix_scale[component]  # (N, d, d)
        return mean + (scale @ z[:, :, None])[:, :, 0]

    @torch.no_grad()
    def refit_prior(self, batches, all_reduce=lambda t: None, iterations: int = PRIOR_REFIT_ITERATIONS) -> None:
        """Refit the sampling prior (fitted or mixture) to this model's own encodings of the training
        images: ``batches()`` yields (uint8 (N, C, S, S), int64 (N,)) of this worker's shard, and
        ``all_reduce`` sums a tensor over the workers in place, so every worker ends with the same prior.

        Why: the online estimate (``_track_*``) follows a moving encoder over its last ~50 batches, and
        the EMA copy that is sampled averages those buffers again over its own window, so the prior
        describes encoders that are not the sampled one. Here the mixture starts from the online means
        and takes ``iterations`` hard-EM passes (each point to the nearest component of its class) on
        the final encodings; no randomness, so a run stays deterministic."""
        if not (self.fitted_prior or self.mixture_components):
            return
        was_training = self.training
        self.eval()
        mus, variances, classes = [], [], []
        for images, labels in batches():
            mu, logvar = self.encode(images.float() / 127.5 - 1)
            mus.append(mu.float())
            variances.append(logvar.float().exp())
            classes.append(self._classes(labels if self.num_classes else None, mu))
        self.train(was_training)
        d = self.latent_dim
        device = self.mix_count.device if self.mixture_components else self.prior_mean.device
        mu = torch.cat(mus) if mus else torch.zeros(0, d, device=device)
        var = torch.cat(variances) if variances else torch.zeros(0, d, device=device)
        cls = torch.cat(classes) if classes else torch.zeros(0, dtype=torch.long, device=device)
        if self.fitted_prior:
            n, s1 = torch.tensor([float(len(mu))], device=device), mu.sum(0)
            s2 = mu.T @ mu + torch.diag(var.sum(0))
            for t in (n, s1, s2):
                all_reduce(t)
            if n.item() < 2:
                return
            mean = s1 / n
            self.prior_mean.copy_(mean)
            self.prior_cov.copy_(s2 / n - mean[:, None] * mean[None, :])
            self._update_prior_scale()
            return
        k = self.mix_count.shape[0]
        owner = torch.div(torch.arange(k, device=device), self.mixture_components, rounding_mode="floor")  # (K,)
        foreign = 1e12 * (cls[:, None] != owner[None, :])  # (N, K): a point may join its own class's only
        means = self.mix_sum / self.mix_count.clamp_min(1e-8)[:, None]  # (K, d): the online estimate
        alive = self.mix_count > 1e-3
        for _ in range(iterations + 1):
            far = foreign + 1e12 * ~alive[None, :]
            onehot = torch.nn.functional.one_hot((torch.cdist(mu, means) + far).argmin(1), k).float() \
                if len(mu) else torch.zeros(0, k, device=device)  # (N, K)
            n_k, s1 = onehot.sum(0), onehot.T @ mu
            all_reduce(n_k)
            all_reduce(s1)
            alive = n_k > 0
            means = torch.where(alive[:, None], s1 / n_k.clamp_min(1e-8)[:, None], means)
        if not alive.any():
            return  # no training images anywhere: keep the online estimate
        s2 = torch.einsum("nk,ni,nj->kij", onehot, mu, mu) + torch.diag_embed(onehot.T @ var)  # (K, d, d)
        all_reduce(s2)
        self.mix_count.copy_(n_k)
        self.mix_sum.copy_(s1)
        self.mix_outer.copy_(s2)
        self._update_mixture_scales()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, with_samples: bool = False
                ) -> tuple[torch.Tensor, ...]:
        """Return (reconstruction logits, mu, logvar); z is sampled by reparameterisation. With
        ``with_samples``, also the logits (N, C, S, S) of N draws of the sampling prior (of the labels'
        classes), decoded in the same forward so that data-parallel training syncs their gradients."""
        mu, logvar = self.encode(images)
        if self.fitted_prior and self.training:
            self._track_prior(mu.detach().float(), logvar.detach().float())
        elif self.mixture_components and self.training:
            self._track_mixture(mu.detach().float(), logvar.detach().float(), labels)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.variational else mu
        logits = self.decode_logits(z, labels)
        if not with_samples:
            return logits, mu, logvar
        # decoded apart from the reconstructions: one batch of both would mix their BatchNorm statistics
        return logits, mu, logvar, self.decode_logits(self.prior_latents(torch.randn_like(mu), labels), labels)

    @torch.no_grad()
    def _track_prior(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Moment-match the batch's aggregate posterior: mean E[mu], covariance Cov(mu) + E[diag(var)].
        No host sync (cholesky_ex), so the step stays capturable as a CUDA graph."""
        mean = mu.mean(0)
        centred = mu - mean
        cov = centred.T @ centred / max(mu.shape[0] - 1, 1) + torch.diag(logvar.exp().mean(0))
        self.prior_mean.lerp_(mean, PRIOR_MOMENTUM)
        self.prior_cov.lerp_(cov, PRIOR_MOMENTUM)
        self._update_prior_scale()


    @torch.no_grad()
    def _track_mixture(self, mu: torch.Tensor, logvar: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One online hard-EM step on the batch's posterior means mu (N, d) [of classes labels (N,)]:
        each point goes to the nearest component of its own class. No host sync."""
        k, n = self.mix_count.shape[0], mu.shape[0]
        device = mu.device
        cls = self._classes(labels, mu)
        owner = torch.div(torch.arange(k, device=device), self.mixture_components, rounding_mode="floor")  # (K,)
        same = cls[None, :] == owner[:, None]  # (K, N): may component j take point i
        count = self.mix_count.clamp_min(1e-8)
        means = self.mix_sum / count[:, None]  # (K, d)
        # an empty component (at the start, or one that lost its points) takes a batch point of its
        # class, point j mod N for component j when the batch is all one class; none if it has none
        rank = (torch.arange(n, device=device)[None, :] - torch.arange(k, device=device)[:, None]) % n
        seeds = mu[(same * (n - rank)).argmax(1)]  # (K, d)
        means = torch.where(((self.mix_count < 1e-3) & same.any(1))[:, None], seeds, means)
        assign = (torch.cdist(mu, means) + 1e12 * ~same.T).argmin(1)  # (N,)
        onehot = torch.nn.functional.one_hot(assign, k).float()  # (N, K)
        var = logvar.exp()
        n_k = onehot.sum(0)  # (K,)
        s1 = onehot.T @ mu  # (K, d)
        s2 = torch.einsum("nk,ni,nj->kij", onehot, mu, mu) + torch.diag_embed(onehot.T @ var)  # (K, d, d)
        keep = 1 - PRIOR_MOMENTUM
        self.mix_count.mul_(keep).add_(n_k)
        self.mix_sum.mul_(keep).add_(s1)
        self.mix_outer.mul_(keep).add_(s2)
        self._update_mixture_scales()

    def _update_mixture_scales(self) -> None:
        """Each component's Cholesky factor from its count, sum and outer-product sum (a failed
        factorisation keeps the old one; no host sync)."""
        count = self.mix_count.clamp_min(1e-8)
        mean = self.mix_sum / count[:, None]
        cov = self.mix_outer / count[:, None, None] - mean[:, :, None] * mean[:, None, :]
        eye = torch.eye(self.latent_dim, device=cov.device)
        scale, info = torch.linalg.cholesky_ex(cov + 1e-4 * eye)
        self.mix_scale.copy_(torch.where((info == 0)[:, None, None], scale, self.mix_scale))

    def _update_prior_scale(self) -> None:
        """The fitted Gaussian's Cholesky factor from prior_cov (a failed factorisation keeps the old one)."""
        eye = torch.eye(self.latent_dim, device=self.prior_cov.device)
        scale, info = torch.linalg.cholesky_ex(self.prior_cov + 1e-5 * eye)
        self.prior_scale.copy_(torch.where(info == 0, scale, self.prior_scale))


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
    """Components of the mixture prior (prior: mixture only); per class when model.num_classes > 0."""
    chroma_gain: float = 1.0
    """Colour images only: the encoder reads, and the decoder writes, opponent colour channels
    (luminance, red-green, yellow-blue) with the two chroma channels scaled by this gain (1 = plain
    RGB). The loss and the optimum are unchanged; the chroma, a small part of the images' variance,
    is learned as early as the shapes instead of last."""
    adversarial_weight: float = 0.0
    """> 0: a spectral-norm discriminator (class-conditional when the VAE is) learns to tell
    reconstructions from training images (hinge loss, on DiffAugment's translation), and
    the VAE's loss gains -weight * lambda * D(reconstruction), lambda sizing the term against the
    reconstruction loss at the decoder's last layer (VQGAN's adaptive weight). Meant to sharpen what a
    pixel likelihood blurs (corners); on the shapes' reconstructions it did not, at 3.5x the time per epoch
    (bench/results/recipes-issue11.md); on the samples (adversarial_fakes) it is what dcgan-shapes uses.
    The discriminator learns at train.lr_d. 0: no discriminator."""
    adversarial_fakes: str = "reconstructions"
    """What the discriminator of adversarial_weight is shown as fake: "reconstructions" of the batch, or
    "samples", decoded draws of the sampling prior for the batch's classes (what `generate` makes), so
    the decoder is also trained where the prior's draws land, between the training encodings."""
    adversarial_start: float = 0.0
    """The fraction of train.epochs after which the adversarial term joins (0: from the first step). Before
    it the step is the plain ELBO's, at its cost, and the discriminator's metrics read 0."""

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ConfigError(f"model.options.beta must be a number >= 0, got {self.beta!r}")
        check_recon_loss(self.recon_loss)
        if self.prior not in PRIORS:
            raise ConfigError(f"model.options.prior={self.prior!r} is unknown; use one of {PRIORS}")
        if not (isinstance(self.mixture_components, int) and 1 <= self.mixture_components <= 64):
            raise ConfigError(f"model.options.mixture_components must be an integer in 1..64, "
                              f"got {self.mixture_components!r}")
        if not (isinstance(self.chroma_gain, (int, float)) and 0 < self.chroma_gain <= 100):
            raise ConfigError(f"model.options.chroma_gain must be a number in (0, 100], got {self.chroma_gain!r}")
        if not (isinstance(self.adversarial_weight, (int, float)) and 0 <= self.adversarial_weight <= 10):
            raise ConfigError(f"model.options.adversarial_weight must be a number in [0, 10], got {self.adversarial_weight!r}")
        if not (isinstance(self.adversarial_start, (int, float)) and 0 <= self.adversarial_start < 1):
            raise ConfigError(f"model.options.adversarial_start must be a number in [0, 1), got {self.adversarial_start!r}")
        if self.adversarial_fakes not in ADVERSARIAL_FAKES:
            raise ConfigError(f"model.options.adversarial_fakes={self.adversarial_fakes!r} is unknown; use one of "
                              f"{ADVERSARIAL_FAKES}")


class _AutoencoderFamily(ModelFamily):
    """What the VAE and the plain AE share: one module that encodes and decodes."""

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode(images)[0]

    def reconstruct(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.reconstruct(images)


@register
class VAEFamily(_AutoencoderFamily):
    name = "vae"
    summary = "convolutional beta-VAE: negative ELBO with the closed-form Gaussian KL"
    Options = VAEOptions
    capabilities = Capabilities(generate=True, reconstruct=True, conditional=True, adversarial=False)
    train_metrics = frozenset({"loss", "recon", "kl"})
    adversarial_metrics = frozenset({"loss_d", "d_real", "d_fake", "adversarial_lambda"})
    """Reported besides train_metrics when model.options.adversarial_weight > 0."""
    pbt_mutable_options = frozenset({"beta"})

    def check(self, m) -> None:
        o = m.opts
        if m.num_classes and o.prior != "mixture":
            # reconstruction finds an image's class from the mixture's per-class components
            raise ConfigError(f"model.num_classes={m.num_classes}: a class-conditional vae needs "
                              f"model.options.prior=mixture, not {o.prior!r}")
        if o.prior == "mixture":
            floats = o.mixture_components * max(m.num_classes, 1) * m.latent_dim**2
            if floats > MAX_MIXTURE_FLOATS:
                raise ConfigError(f"model.options.mixture_components={o.mixture_components} x model.num_classes="
                                  f"{m.num_classes} x model.latent_dim^2={m.latent_dim}^2 is {floats:,} floats per "
                                  f"mixture buffer; at most {MAX_MIXTURE_FLOATS:,}")

    def train_keys_for(self, m) -> frozenset[str]:
        return frozenset({"lr_d"}) if m.opts.adversarial_weight > 0 else frozenset()

    def build(self, m) -> tuple[nn.Module, nn.Module | None]:
        o = m.opts
        return VAE(m.image_size, m.channels, m.latent_dim, m.width, variational=True,
                   fitted_prior=o.prior == "fitted",
                   mixture_components=o.mixture_components if o.prior == "mixture" else 0,
                   num_classes=m.num_classes, chroma_gain=o.chroma_gain), \
            SNDiscriminator(m.image_size, m.channels, m.width, m.num_classes) if o.adversarial_weight > 0 else None

    def step_phase(self, m, progress: float) -> bool:
        """Whether the adversarial term is on at ``progress``."""
        return m.opts.adversarial_weight > 0 and progress >= m.opts.adversarial_start

    def train_step(self, nets: TrainNets, real, labels, ctx, update_g: bool) -> dict[str, torch.Tensor]:
        o = nets.model.opts
        if nets.D is None:
            return vae_step(nets.G, nets.opt_g, real, ctx, o.beta, o.recon_loss, variational=True, labels=labels)
        if not self.step_phase(nets.model, nets.progress):
            out = vae_step(nets.G, nets.opt_g, real, ctx, o.beta, o.recon_loss, variational=True, labels=labels)
            return out | {k: torch.zeros((), device=real.device) for k in self.adversarial_metrics}
        vae = getattr(nets.G, "module", nets.G)  # under DDP
        return vae_adversarial_step(nets.G, nets.D, nets.opt_g, nets.opt_d, real, ctx, o.beta, o.recon_loss,
                                    o.adversarial_weight, vae.decoder.net[-1].weight, labels, ADVERSARIAL_AUGMENT,
                                    o.adversarial_fakes)

    def fit_to_data(self, model: nn.Module, batches, all_reduce) -> None:
        model.refit_prior(batches, all_reduce)

    def sample(self, model: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return model.sample(z, labels)
