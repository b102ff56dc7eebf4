"""Pure per-step functions: one optimisation step given modules, optimizers and a batch.

No Ray here, so the plain-PyTorch benchmark and the Ray Train loop run the same code.
G and D are updated in turn with separate optimizers, never through a summed loss.
Each returns a dict of floats (on the CPU only when ``sync`` is asked for, so the hot
path doesn't force a device sync every step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigc_ray.models.diffaugment import diff_augment


@dataclass
class StepContext:
    """What a step needs besides the batch: the precision context and the loss scaler."""
    autocast: contextlib.AbstractContextManager | None = None
    scaler: torch.amp.GradScaler | None = None

    def cast(self):
        return self.autocast if self.autocast is not None else contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, only_own_grads: bool = False) -> None:
        """Backward and step. ``only_own_grads``: compute gradients for the optimizer's own
        parameters only (the G step then skips D's weight gradients, a third of D's backward)."""
        inputs = [p for group in optimizer.param_groups for p in group["params"]] if only_own_grads else None
        if self.scaler is not None:
            self.scaler.scale(loss).backward(inputs=inputs)
            self.scaler.step(optimizer)
        else:
            loss.backward(inputs=inputs)
            optimizer.step()

    def end_batch(self) -> None:
        """Once per batch, after every optimizer has stepped (torch's AMP recipe for several
        optimizers sharing one scaler)."""
        if self.scaler is not None:
            self.scaler.update()


def augmenter(policy: tuple[str, ...]):
    """What D's inputs go through: DiffAugment with ``policy`` (an op tuple), or nothing when empty."""
    return (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)


def _no_sync(module: nn.Module):
    """Skip DDP's gradient all-reduce for D's backward during the G step: D isn't updated
    there and its grads are zeroed before D's next step."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def gan_step(G: nn.Module, D: nn.Module, opt_g, opt_d, real: torch.Tensor, labels: torch.Tensor | None,
             latent_dim: int, ctx: StepContext, update_g: bool = True,
             augment: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Non-saturating DCGAN step. real: (N, C, S, S) in [-1, 1]; labels: (N,) or None.

    D loss: -[log D(T(x)) + log(1 - D(T(G(z))))]; G loss: -log D(T(G(z))); both with BCE on
    logits. T: DiffAugment with the ``augment`` policy (identity when empty), on real and fake.
    """
    aug = augmenter(augment)
    n = real.shape[0]
    z = torch.randn(n, latent_dim, device=real.device)
    with ctx.cast():
        fake = G(z, labels)  # (N, C, S, S), kept with its graph for the G step
        # D step: fake is detached so no gradient reaches G
        d_real, d_fake = D(aug(real), labels), D(aug(fake.detach()), labels)
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    ctx.backward_step(loss_d, opt_d)
    out = {"loss_d": loss_d.detach(), "d_real": torch.sigmoid(d_real.detach().float()).mean(),
           "d_fake": torch.sigmoid(d_fake.detach().float()).mean()}
    if update_g:
        # G step: D (just updated) scores the same fakes; target "real" = non-saturating loss
        opt_g.zero_grad(set_to_none=True)
        with _no_sync(D), ctx.cast():
            d_gen = D(aug(fake), labels)
            loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        ctx.backward_step(loss_g, opt_g, only_own_grads=True)
        out["loss_g"] = loss_g.detach()
    ctx.end_batch()
    return out


def wgan_gp_step(G: nn.Module, D: nn.Module, opt_g, opt_d, real: torch.Tensor, labels: torch.Tensor | None,
                 latent_dim: int, ctx: StepContext, gp_weight: float, update_g: bool,
                 augment: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One critic step, plus a generator step when ``update_g`` (every critic_steps batches).

    Critic: E[D(G(z))] - E[D(x)] + lambda * E[(||grad D(x_hat)||_2 - 1)^2]; G: -E[D(G(z))].
    Real, fake and interpolated images go through the critic in one forward pass (the
    critic has no BatchNorm, so samples don't interact), which keeps DDP to one
    forward/backward per step. With ``augment``, real and fake are DiffAugmented first and the
    penalty is taken between the augmented images (what the critic sees).
    """
    aug = augmenter(augment)
    n = real.shape[0]
    z = torch.randn(n, latent_dim, device=real.device)
    with torch.no_grad(), ctx.cast():
        fake = aug(G(z, labels).float())
    real = aug(real)
    eps = torch.rand(n, 1, 1, 1, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake.float()).requires_grad_(True)
    both_labels = None if labels is None else labels.repeat(3)
    # the penalty's double backward runs in fp32 for stability
    scores = D(torch.cat([real, fake.float(), x_hat]), both_labels)  # (3N,)
    d_real, d_fake, d_hat = scores.split(n)
    grad = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)[0]
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss_d = d_fake.mean() - d_real.mean() + gp_weight * penalty
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    out = {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean(),
           "gp": penalty.detach()}
    if update_g:
        opt_g.zero_grad(set_to_none=True)
        z = torch.randn(n, latent_dim, device=real.device)
        with _no_sync(D), ctx.cast():
            loss_g = -D(aug(G(z, labels)), labels).float().mean()
        ctx.backward_step(loss_g, opt_g, only_own_grads=True)
        out["loss_g"] = loss_g.detach()
    ctx.end_batch()
    return out


def hinge_step(G: nn.Module, D: nn.Module, opt_g, opt_d, real: torch.Tensor, labels: torch.Tensor | None,
               latent_dim: int, ctx: StepContext, update_g: bool, augment: tuple[str, ...] = (),
               r1_gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """Hinge-loss step (SNGAN, Miyato et al. 2018) with an optional R1 penalty (Mescheder et al. 2018).

    D: E[relu(1 - D(T(x)))] + E[relu(1 + D(T(G(z))))] + r1_gamma/2 * E[||grad D(T(x))||^2], the
    gradient taken at the (augmented) real images D sees; G: -E[D(T(G(z)))]. T: DiffAugment.
    """
    aug = augmenter(augment)
    n = real.shape[0]
    z = torch.randn(n, latent_dim, device=real.device)
    with ctx.cast():
        fake = G(z, labels)  # (N, C, S, S), kept with its graph for the G step
    real_in = aug(real)
    if r1_gamma > 0:
        real_in = real_in.detach().requires_grad_(True)
    with ctx.cast():
        d_real, d_fake = D(real_in, labels), D(aug(fake.detach()), labels)
        loss_d = F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean()
    out = {"d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean()}
    if r1_gamma > 0:
        # the penalty's double backward runs in fp32 (as WGAN-GP's)
        grad = torch.autograd.grad(d_real.float().sum(), real_in, create_graph=True)[0]
        r1 = grad.float().pow(2).flatten(1).sum(1).mean()
        loss_d = loss_d + (r1_gamma / 2) * r1
        out["r1"] = r1.detach()
    else:
        out["r1"] = torch.zeros((), device=real.device)
    opt_d.zero_grad(set_to_none=True)
    ctx.backward_step(loss_d, opt_d)
    out["loss_d"] = loss_d.detach()
    if update_g:
        opt_g.zero_grad(set_to_none=True)
        with _no_sync(D), ctx.cast():
            loss_g = -D(aug(fake), labels).float().mean()
        ctx.backward_step(loss_g, opt_g, only_own_grads=True)
        out["loss_g"] = loss_g.detach()
    ctx.end_batch()
    return out


def _elbo_terms(model: nn.Module, real: torch.Tensor, labels: torch.Tensor | None, ctx: StepContext,
                recon_loss: str, variational: bool, with_samples: bool = False) -> tuple[torch.Tensor, ...]:
    """(reconstruction logits (N, C, S, S), -log p(x|z) per image, KL per image; 0 when not variational)
    [+ the logits (N, C, S, S) of N prior draws of the labels' classes, with ``with_samples``]."""
    n = real.shape[0]
    target = (real + 1) / 2  # pixels in [0, 1]
    with ctx.cast():
        logits, mu, logvar, *drawn = model(real, labels, with_samples=True) if with_samples else model(real, labels)
    logits, mu, logvar = logits.float(), mu.float(), logvar.float()
    if recon_loss == "bce":
        recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
    elif recon_loss == "sigma":
        # Gaussian NLL per image with one variance for all pixels at its optimum, the batch's mean
        # squared error (held constant in the gradient): sum (x - x')^2 / (2 s^2) + D log s
        squared = (torch.sigmoid(logits) - target).pow(2)
        variance = squared.detach().mean().clamp_min(1e-6)
        recon = (squared.sum() / (2 * variance)) / n + 0.5 * squared[0].numel() * variance.log()
    else:
        recon = F.mse_loss(torch.sigmoid(logits), target, reduction="sum") / n
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()) / n if variational else torch.zeros((), device=real.device)
    return (logits, recon, kl, drawn[0].float()) if with_samples else (logits, recon, kl)


def vae_step(model: nn.Module, opt, real: torch.Tensor, ctx: StepContext, beta: float,
             recon_loss: str, variational: bool, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Negative ELBO: -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)), per image.

    Pixels are mapped to [0, 1]; bce is a Bernoulli likelihood on decoder logits, mse a
    Gaussian one with a fixed variance, sigma a Gaussian one with a learned shared variance.
    The plain autoencoder (variational=False) drops the KL term. labels (N,): a class-conditional
    VAE's classes (its decoder reads them), else None.
    """
    _, recon, kl = _elbo_terms(model, real, labels, ctx, recon_loss, variational)
    loss = recon + beta * kl
    opt.zero_grad(set_to_none=True)
    ctx.backward_step(loss, opt)
    ctx.end_batch()
    return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}


def vae_adversarial_step(model: nn.Module, D: nn.Module, opt, opt_d, real: torch.Tensor, ctx: StepContext,
                         beta: float, recon_loss: str, adversarial_weight: float, last_layer: torch.Tensor,
                         labels: torch.Tensor | None = None, augment: tuple[str, ...] = (),
                         fakes: str = "reconstructions") -> dict[str, torch.Tensor]:
    """The VAE's negative ELBO plus a hinge adversarial term on its reconstructions or on its samples
    (VAE-GAN, Larsen et al. 2016, weighted as in VQGAN, Esser et al. 2021).

    D (hinge, on DiffAugmented images): E[relu(1 - D(T(x)))] + E[relu(1 + D(T(x')))], x' the
    reconstruction of x from a sampled z (``fakes="reconstructions"``) or the decoded draw of the
    sampling prior for x's class (``fakes="samples"``: what `generate` makes, so the decoder is also
    trained between the encodings, where the prior's draws land). The model: ELBO - lambda * E[D(T(x'))],
    with lambda = adversarial_weight * ||grad_w recon|| / ||grad_w adv|| at ``last_layer`` (the decoder's
    output weight): the term is sized against the reconstruction loss whatever the likelihood's
    scale, and pushes towards edges the data has where a Gaussian or Bernoulli mean blurs them.
    """
    aug = augmenter(augment)
    if fakes == "samples":
        _, recon, kl, fake_logits = _elbo_terms(model, real, labels, ctx, recon_loss, True, with_samples=True)
    else:
        fake_logits, recon, kl = _elbo_terms(model, real, labels, ctx, recon_loss, variational=True)
    fake = torch.sigmoid(fake_logits) * 2 - 1  # (N, C, S, S) in [-1, 1]
    with ctx.cast():
        d_real, d_fake = D(aug(real), labels), D(aug(fake.detach()), labels)
        loss_d = F.relu(1 - d_real.float()).mean() + F.relu(1 + d_fake.float()).mean()
    opt_d.zero_grad(set_to_none=True)
    ctx.backward_step(loss_d, opt_d)
    with _no_sync(D), ctx.cast():
        adv = -D(aug(fake), labels).float().mean()
    g_recon = torch.autograd.grad(recon, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    weight = adversarial_weight * (g_recon.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()
    loss = recon + beta * kl + weight * adv
    opt.zero_grad(set_to_none=True)
    ctx.backward_step(loss, opt, only_own_grads=True)
    ctx.end_batch()
    return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "loss_d": loss_d.detach(),
            "d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean(),
            "adversarial_lambda": weight}
