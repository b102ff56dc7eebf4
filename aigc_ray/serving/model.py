"""The model deployment: one per served checkpoint, batching by images, hot checkpoint swaps.

`user_config = {"checkpoint": URI}` names the weights (a local path or s3:// / gs:// / file:// URI,
read through pyarrow). Serve calls `reconfigure()` on start and whenever the user_config changes;
a new checkpoint is loaded and test-run before it replaces the old one, so a bad URI leaves the old
model serving and the reason is kept in `info()["last_error"]` (shown by /v1/models) and the log.

Requests are validated here (against the model that will serve them) and split into chunks of at
most `max_batch_images` images; `@serve.batch` then packs chunks from many requests into one
forward pass, counting images (`batch_size_fn`), not requests.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.metrics import Counter, Histogram

from aigc_ray import storage
from aigc_ray.models.checkpoint import read_card
from aigc_ray.pipeline import GeneratorPipeline, PipelineError, png_bytes

logger = logging.getLogger("ray.serve")

AI_LABEL = "true: this image was made by a generative model"


def _images_in(items: list[dict]) -> int:
    return sum(len(item["seeds"]) for item in items)


def png_text(version: str, seed: int | None = None, label: int | None = None) -> dict[str, str]:
    """tEXt chunks every served PNG carries: where it came from and that it is AI-made."""
    text = {"Software": "aigc-ray", "Model-Version": version, "AI-Generated": AI_LABEL}
    if seed is not None:
        text["Seed"] = str(seed)
    if label is not None:
        text["Label"] = str(label)
    return text


class BadRequest(ValueError):
    """A request this model cannot serve; the message names the field (-> 4xx / INVALID_ARGUMENT)."""


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class GeneratorModel:
    def __init__(self, name: str, max_batch_images: int = 64, batch_wait_timeout_s: float = 0.005):
        self.name = name
        self.max_batch_images = max_batch_images
        self.pipe: GeneratorPipeline | None = None
        self.checkpoint = ""
        self.card: dict | None = None
        self.last_error = ""
        self._generate_batch.set_max_batch_size(max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        tags = ("model", "model_version")
        self.images_total = Counter("aigc_images_generated", description="Images generated.", tag_keys=tags)
        self.batch_images = Histogram("aigc_batch_size_images", description="Images per forward pass.",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=tags)
        self.latency_ms = Histogram("aigc_request_latency_ms", description="Model-side request latency (ms).",
                                    boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
                                    tag_keys=(*tags, "op"))

    # ---- checkpoint loading / swapping -------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        uri = str((user_config or {}).get("checkpoint", ""))
        if self.pipe is not None and uri == self.checkpoint:
            return
        started = time.perf_counter()
        try:
            pipe, card = self._load(uri)
        except Exception as err:  # any failure: keep what serves now
            if self.pipe is None:
                raise  # nothing to fall back to: the replica must not come up half-loaded
            self.last_error = f"checkpoint {uri!r} failed to load ({type(err).__name__}: {err}); " \
                              f"still serving {self.pipe.version} from {self.checkpoint!r}"
            logger.error("model %s: %s", self.name, self.last_error)
            return
        old = self.pipe.version if self.pipe else None
        self.pipe, self.card, self.checkpoint, self.last_error = pipe, card, uri, ""
        logger.info("model %s: serving %s from %s (was %s; loaded in %.2fs)", self.name, pipe.version, uri, old,
                    time.perf_counter() - started)

    @staticmethod
    def _load(uri: str) -> tuple[GeneratorPipeline, dict | None]:
        if not uri:
            raise ValueError("user_config.checkpoint is empty")
        import torch

        local = storage.localize(uri)
        try:  # a replica given a GPU (replica_gpus) sees it; any other sees none
            pipe = GeneratorPipeline.from_checkpoint(local, "cuda" if torch.cuda.is_available() else "cpu")
            card = read_card(local)
        finally:
            if local != uri and storage.is_uri(uri):
                shutil.rmtree(local, ignore_errors=True)  # weights are in memory now
        # Check it before it replaces anything: one forward pass through what we will serve.
        if pipe.can_generate:
            pipe.generate([0], [0] if pipe.num_classes else None)
        else:
            pipe.reconstruct(torch.zeros(1, pipe.channels, pipe.image_size, pipe.image_size, dtype=torch.uint8))
        return pipe, card

    def info(self) -> dict[str, Any]:
        p = self.pipe
        return {"name": self.name, "version": p.version, "family": p.family, "checkpoint": self.checkpoint,
                "image_size": p.image_size, "channels": p.channels, "num_classes": p.num_classes,
                "latent_dim": p.latent_dim, "can_generate": p.can_generate, "can_reconstruct": p.can_reconstruct,
                "card": self.card, "last_error": self.last_error}

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError(f"model {self.name}: no checkpoint loaded")

    # ---- generation ----------------------------------------------------------------------------

    async def generate(self, seeds: list[int], labels: list[int] | None) -> dict[str, Any]:
        """PNGs for `seeds`; all from one model version even if a swap lands mid-request."""
        started = time.perf_counter()
        for _ in range(3):
            pipe = self.pipe
            try:
                checked = pipe.check_labels(labels, len(seeds))
            except PipelineError as err:
                raise BadRequest(str(err)) from None
            if not pipe.can_generate:
                raise BadRequest(f"model: {self.name} ({pipe.family}) is a plain autoencoder; use /v1/reconstruct")
            label_list = None if checked is None else checked.tolist()
            n = self.max_batch_images
            chunks = [{"seeds": seeds[i:i + n], "labels": None if label_list is None else label_list[i:i + n]}
                      for i in range(0, len(seeds), n)]
            parts = await asyncio.gather(*(self._generate_batch(c) for c in chunks))
            if any(isinstance(p, Exception) for p in parts) or len({v for v, _ in parts}) > 1:
                continue  # a swap landed between chunks (or changed the label rules): redo on the new model
            version = parts[0][0]
            images = [img for _, imgs in parts for img in imgs]
            self.latency_ms.observe((time.perf_counter() - started) * 1e3,
                                    tags={"model": self.name, "model_version": version, "op": "generate"})
            return {"model": self.name, "model_version": version, "seeds": seeds, "images": images}
        err = next((p for p in parts if isinstance(p, Exception)), None)
        raise BadRequest(str(err)) if err else RuntimeError("model swapped repeatedly during the request")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _generate_batch(self, items: list[dict]) -> list[Any]:
        pipe = self.pipe  # one model for the whole batch, even if reconfigure() swaps meanwhile
        seeds = [s for it in items for s in it["seeds"]]
        labels = None if items[0]["labels"] is None else [y for it in items for y in it["labels"]]
        try:
            images = await asyncio.to_thread(pipe.generate, seeds, labels)
        except PipelineError as err:  # label rules changed under a swap: the caller retries
            return [BadRequest(str(err))] * len(items)
        tags = {"model": self.name, "model_version": pipe.version}
        self.batch_images.observe(len(seeds), tags=tags)
        self.images_total.inc(len(seeds), tags=tags)
        out, i = [], 0
        for it in items:
            pngs = [png_bytes(images[i + j], png_text(pipe.version, s, None if it["labels"] is None else it["labels"][j]))
                    for j, s in enumerate(it["seeds"])]
            out.append((pipe.version, pngs))
            i += len(it["seeds"])
        return out

    async def generate_array(self, seeds: list[int], labels: list[int] | None) -> dict[str, Any]:
        """Like generate, but the images as one uint8 (N, C, H, W) array in .npy bytes."""
        import io

        from torchvision.io import decode_png

        result = await self.generate(seeds, labels)
        arr = np.stack([decode_png(_as_tensor(p)).numpy() for p in result.pop("images")])
        buf = io.BytesIO()
        np.save(buf, arr)
        return {**result, "npy": buf.getvalue()}

    async def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None) -> dict[str, Any]:
        pipe = self.pipe
        try:
            images = await asyncio.to_thread(pipe.interpolate, seed_a, seed_b, steps, label)
        except PipelineError as err:
            raise BadRequest(str(err)) from None
        text = png_text(pipe.version, None, label)
        text["Interpolation"] = f"seed {seed_a} -> seed {seed_b}, {steps} steps"
        return {"model": self.name, "model_version": pipe.version, "seeds": [seed_a, seed_b],
                "images": [png_bytes(img, text) for img in images]}

    async def reconstruct(self, pngs: list[bytes]) -> dict[str, Any]:
        import torch
        from torchvision.io import ImageReadMode, decode_image

        pipe = self.pipe
        if not pipe.can_reconstruct:
            raise BadRequest(f"model: {self.name} ({pipe.family}) has no encoder; reconstruct needs a vae or ae model")
        mode = ImageReadMode.GRAY if pipe.channels == 1 else ImageReadMode.RGB
        decoded = []
        for i, data in enumerate(pngs):
            try:
                img = decode_image(_as_tensor(data), mode=mode)
            except Exception as err:
                raise BadRequest(f"images[{i}]: not a decodable PNG/JPEG image ({type(err).__name__})") from None
            if tuple(img.shape[1:]) != (pipe.image_size, pipe.image_size):
                raise BadRequest(f"images[{i}]: expected {pipe.image_size}x{pipe.image_size} pixels, "
                                 f"got {img.shape[2]}x{img.shape[1]}")
            decoded.append(img)
        out = await asyncio.to_thread(pipe.reconstruct, torch.stack(decoded))
        return {"model": self.name, "model_version": pipe.version, "seeds": [],
                "images": [png_bytes(img, png_text(pipe.version)) for img in out]}


def _as_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
