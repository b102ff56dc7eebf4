"""The GPU fast path: switched off on CPU, validated in the config, FLOPs counted, and (on a
GPU only) bf16 + channels-last + CUDA graphs actually in force."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from aigc_ray.config import ConfigError, ExperimentConfig
from aigc_ray.train.engine import GRAPH_WARMUP_STEPS, Engine, resolve_fast_path
from aigc_ray.train.flops import PEAK_BF16_FLOPS, mfu, peak_flops, train_flops_per_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


def _batch(cfg: ExperimentConfig, n: int, device="cpu"):
    m = cfg.model
    images = torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), dtype=torch.uint8, device=device)
    return images, torch.randint(0, max(m.num_classes, 1), (n,), device=device)


def test_fast_path_switches_itself_off_on_cpu(tmp_path):
    cfg = tiny_config(tmp_path)  # defaults: precision auto, channels_last, cuda_graphs on
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.cuda_graphs) == ("auto", True, True)
    engine = Engine(cfg, torch.device("cpu"))
    fp = engine.fast_path
    assert (fp.precision, fp.channels_last, fp.cuda_graphs, fp.fused_adam, fp.compile) == ("fp32", False, False, False, False)
    assert engine.ctx.autocast is None and engine.ctx.scaler is None
    assert engine.G.net[0].weight.is_contiguous()  # NCHW on CPU
    out = engine.train_batch(*_batch(cfg, 16))
    assert all(torch.isfinite(v) for v in out.values())


def test_explicit_precisions_on_cpu(tmp_path):
    fp16 = resolve_fast_path(tiny_config(tmp_path, **{"train.precision": "fp16"}).train, torch.device("cpu"))
    assert fp16.precision == "fp32" and fp16.notes
    cfg = tiny_config(tmp_path, "vae", **{"train.precision": "bf16"})
    engine = Engine(cfg, torch.device("cpu"))
    assert engine.fast_path.precision == "bf16" and engine.ctx.autocast is not None
    out = engine.train_batch(*_batch(cfg, 16))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("key, value, message", [
    ("train.precision", "fp8", "train.precision='fp8' is unknown"),
    ("train.channels_last", 1, "train.channels_last must be bool"),
    ("train.compile", "yes", "train.compile must be bool"),
    ("train.cuda_graphs", None, "train.cuda_graphs must be bool"),
])
def test_fast_path_settings_are_validated(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_config(tmp_path).with_overrides({key: value})
    with pytest.raises(ConfigError):  # also when the dataclass is built directly
        ExperimentConfig().train.__class__(**{key.split(".")[1]: value})


def test_flops_are_positive_and_scale_with_image_size():
    def cfg(family: str, size: int, **model) -> ExperimentConfig:
        return ExperimentConfig.from_dict({"data": {"image_size": size, "channels": 3},
                                           "model": {"family": family, "image_size": size, "channels": 3, **model}})

    dcgan32, dcgan64 = (train_flops_per_image(cfg("dcgan", s, width=16, latent_dim=32)) for s in (32, 64))
    assert dcgan32 > 0
    # 4x the pixels, plus one more stride-2 block at width*8 channels at 64 px: 5.9x, not exactly 4x
    assert 4.0 <= dcgan64 / dcgan32 <= 6.5
    recipe32, recipe64 = (train_flops_per_image(cfg("seed-recipe", s, latent_dim=16)) for s in (32, 64))
    assert recipe64 / recipe32 == pytest.approx(4.0, rel=0.02)  # same layers, 4x the pixels
    for family in ("wgan-gp", "vae"):
        assert train_flops_per_image(cfg(family, 32, width=8, latent_dim=8)) > 0


def test_every_peak_table_entry_is_reachable_and_mfu():
    """Names are matched by substring, first hit wins: a device named after any entry must get that
    entry's peak, not one of a shorter name listed earlier ("L4" would shadow "L40S", "H100" "H100 PCIe")."""
    for key, peak in PEAK_BF16_FLOPS:
        for name in (f"NVIDIA {key}", f"NVIDIA {key.upper()} 80GB"):
            assert peak_flops(name) == peak, f"{name!r} resolved to another entry's peak"
    assert peak_flops("Mystery GPU") is None
    assert peak_flops("NVIDIA H100 PCIe", override_tflops=100) == 100e12  # the user's figure wins
    assert mfu(1000, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000, 1e9, None) is None


def test_compiled_step_on_cpu(tmp_path):
    """torch.compile on a tiny model, if it compiles quickly enough here (cold: ~1 min on 2 cores)."""
    cfg = tiny_config(tmp_path, **{"train.compile": True, "model.width": 4, "train.ema_decay": 0.9})
    engine = Engine(cfg, torch.device("cpu"))
    assert engine.fast_path.compile
    started = time.perf_counter()
    for _ in range(3):
        out = engine.train_batch(*_batch(cfg, 16))
    assert all(torch.isfinite(v) for v in out.values())
    state = engine.state_dict()
    assert not any("_orig_mod" in k for k in state["generator"]) and not any("_orig_mod" in k for k in state["discriminator"])
    Engine(cfg.with_overrides({"train.compile": False}), torch.device("cpu")).load_state_dict(state)
    print(f"compile + 3 steps: {time.perf_counter() - started:.1f}s")


def test_ema_update_matches_averaged_model(tmp_path):
    """The engine's sync-free EMA update does what AveragedModel.update_parameters would."""
    from torch.optim.swa_utils import AveragedModel

    from aigc_ray.train.engine import _unwrap, ema_with_warmup

    cfg = tiny_config(tmp_path, **{"train.ema_decay": 0.9})
    engine = Engine(cfg, torch.device("cpu"))
    ref = AveragedModel(_unwrap(engine.G), multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    for _ in range(4):
        engine.train_batch(*_batch(cfg, 16))
        ref.update_parameters(_unwrap(engine.G))
    for a, b in zip(engine.ema.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_bench_smoke_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--device", "cpu", "--smoke", "--cases", "dcgan-32,vae-64",
           "--batch-sizes", "8", "--steps", "2", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    result = json.loads(next(tmp_path.glob("train_gpu-smoke-*.json")).read_text())
    assert {r["variant"] for r in result["results"]} == {"plain", "fast"}
    assert all(r["images_per_s"] > 0 and r["finite"] for r in result["results"])
    assert all(v > 0 for v in result["flops_per_image"].values())
    assert next(tmp_path.glob("train_gpu-smoke-*.png")).stat().st_size > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["dcgan", "wgan-gp", "vae"])
def test_cuda_fast_path(tmp_path, family):
    cfg = tiny_config(tmp_path, family, **{"train.use_gpu": True, "train.critic_steps": 2 if family == "wgan-gp" else 1})
    device = torch.device("cuda")
    engine = Engine(cfg, device)
    fp = engine.fast_path
    assert fp.precision in ("bf16", "fp16") and fp.channels_last and fp.fused_adam
    assert engine.G.net[0].weight.is_contiguous(memory_format=torch.channels_last) if family != "vae" else True
    images, labels = _batch(cfg, 16, device)
    for _ in range(4 * (GRAPH_WARMUP_STEPS + 2)):
        out = engine.train_batch(images, labels)
    torch.cuda.synchronize()
    assert all(torch.isfinite(v) for v in out.values())
    if fp.precision == "bf16":
        assert engine.fast_path.cuda_graphs and engine._graphs, engine.fast_path.notes
        # the captured step reads its learning rate from a device tensor: a new scale reaches the
        # replays (a zero rate freezes the weights, which a rate baked into the graph would not)
        engine.set_lr_scale(0.0)
        frozen = [p.detach().clone() for p in engine.G.parameters()]
        for _ in range(3):
            engine.train_batch(images, labels)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(frozen, engine.G.parameters()))
        engine.set_lr_scale(1.0)
    # a resumed engine recaptures against its own optimizer state
    again = Engine(cfg, device)
    again.load_state_dict(engine.state_dict())
    for _ in range(2 * (GRAPH_WARMUP_STEPS + 2)):
        out = again.train_batch(images, labels)
    assert all(torch.isfinite(v) for v in out.values())
    assert again.opt_g.param_groups[0]["capturable"] == fp.cuda_graphs
