"""FLOPs of one training step, counted with ``torch.utils.flop_counter``, and model FLOP
utilisation (MFU) against a device's dense bf16 peak.

The count runs the Engine's own step (forwards, backwards, the WGAN-GP penalty's double
backward) once on the CPU in fp32 with augmentation off; the counter sees matmuls and
convolutions (what tensor cores do), not element-wise work or the optimizer. Conv and linear
FLOPs are linear in the batch, so the result is given per image.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from aigc_ray.config import ExperimentConfig

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name;
# the first match wins, so specific names come before general ones.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12),  # V100/T4: fp16 (no bf16)
]


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (``override_tflops`` wins), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def train_flops_per_image(cfg: ExperimentConfig) -> float:
    """Counted FLOPs of one training batch, per image, averaged over ``critic_steps`` batches
    (so a WGAN-GP generator step every 5th batch is counted once in 5)."""
    batch = 4
    cfg = cfg.with_overrides({
        "train.precision": "fp32", "train.compile": False, "train.cuda_graphs": False, "train.ema_decay": 0.0,
        "train.batch_size": batch, "train.workers": 1, "data.random_crop": False, "data.rotation_degrees": 0.0,
        "data.scale_range": 0.0, "data.horizontal_flip": False})
    from aigc_ray.train.engine import Engine  # engine imports models; keep this module light

    rng_state = torch.get_rng_state()
    try:
        engine = Engine(cfg, torch.device("cpu"))
        m = cfg.model
        images = torch.randint(0, 256, (batch, m.channels, m.image_size, m.image_size), dtype=torch.uint8)
        labels = torch.randint(0, max(m.num_classes, 1), (batch,))
        with FlopCounterMode(display=False) as counter:
            for _ in range(cfg.train.critic_steps):
                engine.train_batch(images, labels)
    finally:
        torch.set_rng_state(rng_state)
    return counter.get_total_flops() / (batch * cfg.train.critic_steps)


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved counted FLOP/s over the device's peak."""
    return images_per_s * flops_per_image / peak if peak else None
