"""Everything a training worker holds, without Ray: models, optimizers, EMA, step counter.

The Ray Train loop (loop.py) and the plain-PyTorch benchmark both drive this, so the only
difference between them is Ray. ``wrap`` lets the caller put G and D through DDP
(Ray's ``prepare_model``) after they are built.

The GPU fast path is applied here and only here (``resolve_fast_path`` says what is on):
bf16 autocast (fp16 + grad scaler without bf16), channels-last, fused Adam, optional
torch.compile, and the whole step captured as a CUDA graph after a few warm-up steps. On CPU
it switches itself off. (GPU-resident data is the loop's job: ShardBatches keeps small
shards on the device, see ``data.cache_in_memory_mb``.)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from aigc_ray.config import ExperimentConfig, TrainConfig
from aigc_ray.data.augment import augment_batch
from aigc_ray.models import TrainNets
from aigc_ray.models.steps import StepContext

GRAPH_WARMUP_STEPS = 3  # eager steps (on a side stream) before a step shape is captured


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module under torch.compile and/or DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return module.module if isinstance(module, DistributedDataParallel) else module


def lr_scale(progress: float, decay_start: float) -> float:
    """The learning rates' factor at ``progress`` (the fraction of training done, in [0, 1)): 1 until
    ``decay_start``, then linear towards 0 at progress 1 (train.lr_decay_start)."""
    if progress < decay_start or decay_start >= 1:
        return 1.0
    return max(0.0, (1 - progress) / (1 - decay_start))


def set_learning_rate(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    """Every param group of ``optimizer`` at ``lr``, in place where the rate is a device tensor (a captured
    CUDA graph reads it at every replay)."""
    for group in optimizer.param_groups if optimizer is not None else ():
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)) over n updates, so the
    average isn't dominated by the random initial weights in a short run (with a fixed
    0.999, 27% of the weight is still on the initialisation after 1,300 steps).
    ``num_averaged`` may be an int (no device sync) or a tensor."""

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


@dataclass
class FastPath:
    """The settings in force on this device (the config's wishes, resolved)."""
    precision: str  # bf16 | fp16 | fp32
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    fused_adam: bool
    notes: list[str] = field(default_factory=list)  # why a requested switch is off

    def summary(self) -> str:
        on = [self.precision] + [k for k in ("channels_last", "fused_adam", "compile", "cuda_graphs") if getattr(self, k)]
        return " ".join(on) + (f" ({'; '.join(self.notes)})" if self.notes else "")


def resolve_fast_path(t: TrainConfig, device: torch.device) -> FastPath:
    """What the config asks for, given the device. "auto" precision is bf16 on CUDA (fp16 where
    bf16 is missing) and fp32 on CPU; channels-last, fused Adam and CUDA graphs are CUDA-only."""
    cuda, notes = device.type == "cuda", []
    precision = t.precision
    if cuda:
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "auto":
            precision = "bf16" if bf16_ok else "fp16"
        elif precision == "bf16" and not bf16_ok:
            precision = "fp16"
            notes.append("bf16 not supported by this GPU: fp16")
    elif precision == "auto":
        precision = "fp32"
    elif precision == "fp16":
        precision = "fp32"
        notes.append("fp16 on CPU: fp32")
    graphs = cuda and t.cuda_graphs
    if graphs and precision == "fp16":
        graphs = False
        notes.append("no CUDA graphs with fp16 (the grad scaler syncs)")
    return FastPath(precision=precision, channels_last=cuda and t.channels_last, compile=t.compile,
                    cuda_graphs=graphs, fused_adam=cuda, notes=notes)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    real: torch.Tensor
    labels: torch.Tensor | None
    keys: list[str]
    packed: torch.Tensor  # the step's outputs, stacked inside the graph


class Engine:
    def __init__(self, cfg: ExperimentConfig, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.cfg, self.device = cfg, device
        t, m = cfg.train, cfg.model
        fp = self.fast_path = resolve_fast_path(t, device)
        fmt = torch.channels_last if fp.channels_last else torch.contiguous_format
        self.family = m.family_spec
        torch.manual_seed(t.seed)  # identical initial weights on every worker
        G, D = self.family.build(m)
        self.G = wrap(G.to(device, memory_format=fmt))
        self.D = wrap(D.to(device, memory_format=fmt)) if D is not None else None
        if fp.cuda_graphs and isinstance(self.G, DistributedDataParallel):
            fp.cuda_graphs = False
            fp.notes.append("no CUDA graphs under DDP (more than one worker)")
        if fp.compile:
            self.G = torch.compile(self.G, dynamic=False)
            if self.D is not None and not self.family.needs_double_backward(m):  # a penalty's double backward
                self.D = torch.compile(self.D, dynamic=False)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest conv algorithms once
        self._adam = {"betas": (t.beta1, t.beta2), "fused": fp.fused_adam, "capturable": fp.cuda_graphs}
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=self._lr(t.lr_g), **self._adam)
        self.opt_d = (torch.optim.Adam(self.D.parameters(), lr=self._lr(t.lr_d), **self._adam)
                      if self.D is not None else None)
        for opt in (self.opt_g, self.opt_d):
            if opt is not None:  # the warm-up steps run uncaptured on purpose
                opt._warned_capturable_if_run_uncaptured = True
        self.ema = AveragedModel(_unwrap(self.G), use_buffers=True) if t.ema_decay > 0 else None
        self._ema_update = ema_with_warmup(t.ema_decay)
        self.ctx = StepContext()
        if fp.precision != "fp32":
            dtype = torch.bfloat16 if fp.precision == "bf16" else torch.float16
            # autocast's weight cache can't live across CUDA-graph replays
            self.ctx = StepContext(torch.autocast(device.type, dtype=dtype, cache_enabled=not fp.cuda_graphs),
                                   torch.amp.GradScaler("cuda") if fp.precision == "fp16" else None)
        self.step = 0  # batches seen (one D update each for GANs)
        self.progress = 0.0  # the fraction of training done when this epoch began (set_progress)
        self.g_steps = 0
        self.aug_generator = torch.Generator().manual_seed(t.seed + 1)
        self._graphs: dict[tuple, _Captured] = {}
        self._warmups: dict[tuple, int] = {}

    # --- one batch ----------------------------------------------------------------------
    def train_batch(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images_u8: uint8 (N, C, S, S) on self.device; labels: int64 (N,). Returns the
        step's losses as device tensors (no sync)."""
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        real = images_u8.float() / 127.5 - 1
        if d.augment:
            real = augment_batch(real, random_crop=d.random_crop, rotation_degrees=d.rotation_degrees,
                                 scale_range=d.scale_range, horizontal_flip=d.horizontal_flip,
                                 generator=self.aug_generator)
        if self.fast_path.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        cond = labels if m.num_classes else None
        self.step += 1
        update_g = self.step % t.critic_steps == 0 or self.D is None
        if self.fast_path.cuda_graphs:
            out = self._graphed_step(real, cond, update_g)
        else:
            out = self._step(real, cond, update_g)
        if update_g:
            self.g_steps += 1
            if self.ema is not None:
                self._update_ema()
        return out

    def fit_to_data(self, batches) -> None:
        """Every worker, before a checkpoint: the family fits what it derives from the training data
        (a VAE's prior) to the served module, summing over the workers (ModelFamily.fit_to_data)."""
        group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.family.fit_to_data(self.served_module(), batches, dist.all_reduce if group else lambda t: None)

    def _step(self, real: torch.Tensor, cond: torch.Tensor | None, update_g: bool) -> dict[str, torch.Tensor]:
        nets = TrainNets(self.G, self.D, self.opt_g, self.opt_d, self.cfg.model, self.cfg.train, self.progress)
        return self.family.train_step(nets, real, cond, self.ctx, update_g)

    def _update_ema(self) -> None:
        """AveragedModel.update_parameters, minus its device syncs: the count is read on the host."""
        ema = self.ema
        pairs = list(zip([*ema.module.parameters(), *ema.module.buffers()],
                         [*_unwrap(self.G).parameters(), *_unwrap(self.G).buffers()]))
        n = int(ema.n_averaged)  # a CPU buffer
        if n == 0:
            with torch.no_grad():
                torch._foreach_copy_([e for e, _ in pairs], [p.detach() for _, p in pairs])
        else:
            self._ema_update([e.detach() for e, _ in pairs], [p.detach() for _, p in pairs], n)
        ema.n_averaged += 1

    # --- CUDA graphs --------------------------------------------------------------------
    def _graphed_step(self, real, cond, update_g: bool) -> dict[str, torch.Tensor]:
        key = (update_g, tuple(real.shape), self.family.step_phase(self.cfg.model, self.progress))
        captured = self._graphs.get(key)
        if captured is None:
            done = self._warmups.get(key, 0)
            if done < GRAPH_WARMUP_STEPS:  # warm up on a side stream, as capture requires
                self._warmups[key] = done + 1
                main, side = torch.cuda.current_stream(), torch.cuda.Stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    out = self._step(real, cond, update_g)
                main.wait_stream(side)
                for value in out.values():
                    value.record_stream(main)
                return out
            try:
                captured = self._graphs[key] = self._capture(real, cond, update_g)
            except Exception as exc:  # noqa: BLE001 - any capture failure: carry on eagerly
                warnings.warn(f"CUDA graph capture failed ({exc!r}); training on without CUDA graphs", stacklevel=2)
                self.fast_path.cuda_graphs = False
                self.fast_path.notes.append("CUDA graph capture failed")
                self._graphs.clear()
                torch.cuda.synchronize()
                return self._step(real, cond, update_g)
        captured.real.copy_(real)
        if cond is not None:
            captured.labels.copy_(cond)
        captured.graph.replay()
        values = captured.packed.clone()  # the graph's outputs are overwritten by the next replay
        return dict(zip(captured.keys, values.unbind()))

    def _capture(self, real, cond, update_g: bool) -> _Captured:
        static_real = real.clone()
        static_labels = cond.clone() if cond is not None else None
        graph = torch.cuda.CUDAGraph()
        # thread_local: Ray Data's prefetch threads may copy to the GPU meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._step(static_real, static_labels, update_g)
            packed = torch.stack([v.float() for v in out.values()])
        return _Captured(graph, static_real, static_labels, list(out), packed)

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
        self._load_optimizer(self.opt_g, state["opt_g"], self.cfg.train.lr_g)
        if self.D is not None:
            _unwrap(self.D).load_state_dict(state["discriminator"])
            self._load_optimizer(self.opt_d, state["opt_d"], self.cfg.train.lr_d)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.step, self.g_steps = state["step"], state["g_steps"]
        self.aug_generator.set_state(state["aug_rng"])
        self._graphs.clear()  # captured graphs point at the optimizer state just replaced
        self._warmups.clear()

    def _lr(self, lr: float) -> float | torch.Tensor:
        """A learning rate as the optimizer holds it: a device tensor when the step is a captured CUDA
        graph, which reads it at every replay (a float would be baked into the graph), so that
        set_lr_scale() reaches the captured step."""
        return torch.tensor(lr, device=self.device) if self.fast_path.cuda_graphs else lr

    def set_progress(self, progress: float) -> None:
        """The fraction of training done, from now on (what a family's step may schedule on:
        ModelFamily.step_phase)."""
        self.progress = float(progress)

    def set_lr_scale(self, scale: float) -> None:
        """Train at ``scale`` times the config's learning rates from now on (see lr_scale)."""
        set_learning_rate(self.opt_g, self.cfg.train.lr_g * scale)
        set_learning_rate(self.opt_d, self.cfg.train.lr_d * scale)

    def _load_optimizer(self, opt: torch.optim.Optimizer, state: dict, lr: float) -> None:
        """Load with this engine's fused/capturable flags, not the saving machine's (a CPU
        checkpoint resumed on a GPU, or the reverse), and with this config's learning rate and
        betas: the config is the source of truth, so a PBT trial restored from another trial's
        checkpoint trains at its own (mutated) hyperparameters. (The training loop then applies the
        epoch's lr_scale.)"""
        own = {k: self._adam[k] for k in ("fused", "capturable", "betas")} | {"lr": self._lr(lr)}
        state = dict(state, param_groups=[dict(copy.copy(g), **own) for g in state["param_groups"]])
        opt.load_state_dict(state)

    @torch.no_grad()
    def sample_grid(self, z: torch.Tensor, labels: torch.Tensor | None, real: torch.Tensor | None) -> torch.Tensor:
        """The epoch's sample grid in [-1, 1], from the served module in eval mode: samples of the
        fixed latents z (N, latent_dim), or, for a family that cannot generate (a plain
        autoencoder), reconstructions of ``real`` (fixed training images (N, C, S, S) in [-1, 1])."""
        model = self.served_module()
        was_training = model.training
        model.eval()
        try:
            if self.family.capabilities.generate:
                return self.family.sample(model, z, labels if self.cfg.model.num_classes else None)
            return self.family.reconstruct(model, real)
        finally:
            model.train(was_training)
