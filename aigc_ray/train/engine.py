"""Everything a training worker holds, without Ray: models, optimizers, EMA, step counter.

The Ray Train loop (loop.py) and the plain-PyTorch benchmark both drive this, so the only
difference between them is Ray. ``wrap`` lets the caller put G and D through DDP
(Ray's ``prepare_model``) after they are built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from aigc_ray.config import ExperimentConfig
from aigc_ray.data.augment import augment_batch
from aigc_ray.models import build_discriminator, build_generator
from aigc_ray.train.steps import StepContext, gan_step, vae_step, wgan_gp_step


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)) over n updates, so the
    average isn't dominated by the random initial weights in a short run (with a fixed
    0.999, 27% of the weight is still on the initialisation after 1,300 steps)."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1 - d)
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():
                e.copy_(p)

    return update


class Engine:
    def __init__(self, cfg: ExperimentConfig, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.cfg, self.device = cfg, device
        t, m = cfg.train, cfg.model
        torch.manual_seed(t.seed)  # identical initial weights on every worker
        self.G = wrap(build_generator(m).to(device))
        D = build_discriminator(m)
        self.D = wrap(D.to(device)) if D is not None else None
        betas = (t.beta1, t.beta2)
        fused = device.type == "cuda"
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=betas, fused=fused)
        self.opt_d = (torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=betas, fused=fused)
                      if self.D is not None else None)
        self.ema = (AveragedModel(_unwrap(self.G), multi_avg_fn=ema_with_warmup(t.ema_decay), use_buffers=True)
                    if t.ema_decay > 0 else None)
        self.ctx = StepContext()
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.ctx = StepContext(torch.autocast("cuda", dtype=dtype),
                                   torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)
        self.step = 0  # batches seen (one D update each for GANs)
        self.g_steps = 0
        self.aug_generator = torch.Generator().manual_seed(t.seed + 1)

    # --- one batch ----------------------------------------------------------------------
    def train_batch(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images_u8: uint8 (N, C, S, S) on self.device; labels: int64 (N,)."""
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        real = images_u8.float() / 127.5 - 1
        if d.augment:
            real = augment_batch(real, random_crop=d.random_crop, rotation_degrees=d.rotation_degrees,
                                 scale_range=d.scale_range, horizontal_flip=d.horizontal_flip,
                                 generator=self.aug_generator)
        cond = labels if m.num_classes else None
        self.step += 1
        update_g = self.step % t.critic_steps == 0
        if m.family in ("dcgan", "seed-recipe"):
            out = gan_step(self.G, self.D, self.opt_g, self.opt_d, real, cond, m.latent_dim, self.ctx, update_g)
        elif m.family == "wgan-gp":
            out = wgan_gp_step(self.G, self.D, self.opt_g, self.opt_d, real, cond, m.latent_dim, self.ctx,
                               t.gp_weight, update_g)
        else:
            out = vae_step(self.G, self.opt_g, real, self.ctx, m.beta, m.recon_loss, m.family == "vae")
            update_g = True
        if update_g:
            self.g_steps += 1
            if self.ema is not None:
                self.ema.update_parameters(_unwrap(self.G))
        return out

    # --- state --------------------------------------------------------------------------
    def served_module(self) -> nn.Module:
        """The generator that is sampled and served: EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else _unwrap(self.G)

    def state_dict(self) -> dict:
        state = {"generator": _unwrap(self.G).state_dict(), "opt_g": self.opt_g.state_dict(),
                 "step": self.step, "g_steps": self.g_steps, "aug_rng": self.aug_generator.get_state()}
        if self.D is not None:
            state.update(discriminator=_unwrap(self.D).state_dict(), opt_d=self.opt_d.state_dict())
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        _unwrap(self.G).load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.D is not None:
            _unwrap(self.D).load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.step, self.g_steps = state["step"], state["g_steps"]
        self.aug_generator.set_state(state["aug_rng"])

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Images in [-1, 1] from the served generator, in eval mode."""
        model = self.served_module()
        was_training = model.training
        model.eval()
        try:
            if self.cfg.model.family in ("vae", "ae"):
                return model.decode(z) if self.cfg.model.family == "vae" else model.decode(model.encode(z)[0])
            return model(z, labels if self.cfg.model.num_classes else None)
        finally:
            model.train(was_training)
