"""Inference pipeline: sample, interpolate and reconstruct from a checkpoint alone.

Used by `aigc-ray generate`, eval, export and Serve. No Ray, no training code. Determinism:
image i of a request with seed s has the latent row aigc_ray.latents gives seed s + i (a rule
the offline ONNX generator shares), so an image depends only on (model version, its seed, its
label), never on what it was batched with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aigc_ray.images import encode_png, make_grid
from aigc_ray.latents import seed_labels, seed_latents
from aigc_ray.models import get_family
from aigc_ray.models.checkpoint import load_generator, model_version


class PipelineError(ValueError):
    """Bad input for this model (e.g. labels for an unconditional one); message names the field."""


class GeneratorPipeline:
    def __init__(self, model: torch.nn.Module, meta: dict, version: str, device: str | torch.device = "cpu"):
        self.model, self.meta, self.version, self.device = model, meta, version, torch.device(device)
        cfg = meta["model"]
        self.family: str = cfg["family"]
        self.spec = get_family(self.family)  # what this family can do, and how
        self.latent_dim: int = cfg["latent_dim"]
        self.num_classes: int = cfg["num_classes"]
        self.image_size: int = cfg["image_size"]
        self.channels: int = cfg["channels"]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> GeneratorPipeline:
        model, meta = load_generator(path, device)
        return cls(model, meta, model_version(path), device)

    @property
    def can_generate(self) -> bool:
        return self.spec.capabilities.generate

    @property
    def can_reconstruct(self) -> bool:
        return self.spec.capabilities.reconstruct

    def latents(self, seeds: list[int]) -> torch.Tensor:
        """(N, latent_dim) standard-normal noise, row i drawn from seed seeds[i] (aigc_ray.latents)."""
        return torch.from_numpy(seed_latents(seeds, self.latent_dim)).to(self.device)

    def check_labels(self, labels: list[int] | None, seeds: list[int]) -> torch.Tensor | None:
        """The labels for `seeds` (one label = all); a conditional model given none draws class
        seed mod num_classes for each seed (aigc_ray.latents.seed_labels)."""
        count = len(seeds)
        if self.num_classes == 0:
            if labels:
                raise PipelineError(f"labels: model {self.version} is unconditional; omit labels")
            return None
        if not labels:
            labels = seed_labels(seeds, self.num_classes)
        if len(labels) == 1:
            labels = labels * count
        if len(labels) != count:
            raise PipelineError(f"labels: got {len(labels)} labels for {count} images")
        bad = [y for y in labels if not 0 <= y < self.num_classes]
        if bad:
            raise PipelineError(f"labels: {bad[:5]} out of range [0, {self.num_classes - 1}]")
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (N, latent_dim) -> uint8 images (N, C, S, S)."""
        if not self.can_generate:
            raise PipelineError(f"model: {self.version} ({self.family}) cannot generate; it can only reconstruct")
        return to_uint8(self.spec.sample(self.model, z, labels))

    def generate(self, seeds: list[int], labels: list[int] | None = None) -> torch.Tensor:
        return self.decode(self.latents(seeds), self.check_labels(labels, seeds))

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> torch.Tensor:
        """Spherical interpolation between the latents of two seeds: (steps, C, S, S) uint8."""
        a, b = self.latents([seed_a, seed_b])
        t = torch.linspace(0, 1, steps, device=self.device)[:, None]
        omega = torch.arccos((a / a.norm() * b / b.norm()).sum().clamp(-1 + 1e-6, 1 - 1e-6))
        z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
        labels = self.check_labels(None if label is None else [label], [seed_a] * steps)
        return self.decode(z, labels)

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) -> uint8 reconstructions through the encoder's mean."""
        return to_uint8(self.spec.reconstruct(self.model, self._encoder_input(images, "reconstruct")))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) -> the encoder's mean (N, latent_dim)."""
        return self.spec.encode(self.model, self._encoder_input(images, "encode"))

    def _encoder_input(self, images: torch.Tensor, what: str) -> torch.Tensor:
        """uint8 (N, C, S, S), checked -> float in [-1, 1] on the model's device."""
        if not self.can_reconstruct:
            raise PipelineError(f"model: {self.version} ({self.family}) has no encoder; it cannot {what}")
        expected = (self.channels, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise PipelineError(f"image: expected {expected[0]}x{expected[1]}x{expected[2]} (CxHxW), "
                                f"got {'x'.join(map(str, images.shape[1:]))}")
        return images.to(self.device, torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def grid_png(images: torch.Tensor, nrow: int = 8, text: dict[str, str] | None = None) -> bytes:
    """uint8 (N, C, S, S) -> PNG bytes of one grid (2-pixel padding)."""
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=0)
    return encode_png(grid, text)
