"""A served checkpoint (ModelCore): batching by images, hot checkpoint swaps. The first model runs inside the
ingress replica (LocalModel, app.py); every other model and every canary is a GeneratorModel deployment.

`user_config = {"checkpoint": URI}` names the weights (a local path or s3:// / gs:// / file:// URI,
read through pyarrow). Serve calls `reconfigure()` on start and whenever the user_config changes;
a new checkpoint is loaded and test-run before it replaces the old one, so a bad URI leaves the old
model serving and the reason is kept in `info()["last_error"]` (shown by /v1/models) and the log.
Only a checkpoint that loaded and passed that test run is recorded as last known good (serving/lkg.py);
a replica started later whose configured checkpoint fails serves that one instead, marked degraded
(`info()["degraded"]`, the aigc_model_degraded gauge), rather than failing its constructor forever.

Requests are validated here (against the model that will serve them) and split into chunks of at
most `max_batch_images` images; `@serve.batch` then packs chunks from many requests into one
forward pass, counting images (`batch_size_fn`), not requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from aigc_ray import storage
from aigc_ray.images import decode_png, encode_png
from aigc_ray.models.checkpoint import read_card
from aigc_ray.pipeline import GeneratorPipeline, PipelineError
from aigc_ray.serving import lkg
from aigc_ray.serving.png import BadImage, check_png

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


class ModelCore:
    """One served checkpoint: loading, swaps, batching. Runs as its own deployment (GeneratorModel: the
    app's other models and canaries) or inside the ingress replica (the default model, no extra hop)."""

    def __init__(self, name: str, max_batch_images: int = 64, batch_wait_timeout_s: float = 0.005,
                 role: str = "current"):
        self.name, self.role = name, role  # role "canary": a candidate beside the current version (canary.py)
        self.max_batch_images = max_batch_images
        self.pipe: GeneratorPipeline | None = None
        self.checkpoint = ""
        self.card: dict | None = None
        self.last_error = ""
        self.requested = ""  # the checkpoint user_config asks for; differs from self.checkpoint when degraded
        self.lkg_key = f"{serve.get_replica_context().app_name}/{name}"
        self.degraded_gauge = Gauge("aigc_model_degraded", description="1 while a model serves an older checkpoint "
                                    "than the one configured (that one failed to load).", tag_keys=("model",))
        self._generate_batch.set_max_batch_size(max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        tags = ("model", "model_version")
        self.images_total = Counter("aigc_images_generated", description="Images generated.", tag_keys=tags)
        self.batch_images = Histogram("aigc_batch_size_images", description="Images per forward pass.",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=tags)
        self.latency_ms = Histogram("aigc_request_latency_ms", description="Model-side request latency (ms).",
                                    boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
                                    tag_keys=(*tags, "op"))
        self.text = {"active": 0, "tokens": 0, "cancelled": 0}  # text streams now, bytes sampled, streams cut short
        self.text_tokens = Counter("aigc_text_tokens_generated", description="Bytes sampled by text models.",
                                   tag_keys=("model", "outcome"))
        self.quality = Gauge("aigc_model_quality", description="The served checkpoint's quality card: fid, its floor "
                             "and fid_over_floor (lower is better).", tag_keys=(*tags, "role", "metric"))

    # ---- checkpoint loading / swapping -------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        uri = str((user_config or {}).get("checkpoint", ""))
        if self.pipe is not None and uri == self.requested:  # unchanged (Serve also calls this on start)
            return
        self.requested = uri
        started = time.perf_counter()
        try:
            pipe, card = self._load(uri)
        except Exception as err:  # any failure: keep what serves now, or fall back to the last known good
            reason = f"checkpoint {uri!r} failed to load ({type(err).__name__}: {str(err)[:300]})"
            if self.pipe is None and self.role == "canary":  # stays up empty: promote sees why and removes it,
                self.last_error = reason                        # and requests fail fast (counted against it)
                logger.error("model %s (candidate): %s", self.name, reason)
                return
            if self.pipe is None:
                self._fall_back(reason)
            self.last_error = f"{reason}; still serving {self.pipe.version} from {self.checkpoint!r}"
            self.degraded_gauge.set(1, tags={"model": self.name})
            logger.error("model %s: %s", self.name, self.last_error)
            return
        old = self.pipe.version if self.pipe else None
        self._serve(pipe, card, uri)
        if self.role == "current":  # a candidate is not known good until promoted (--finish)
            lkg.remember(self.lkg_key, {"checkpoint": uri, "version": pipe.version})
        logger.info("model %s: serving %s from %s (was %s; loaded in %.2fs)", self.name, pipe.version, uri, old,
                    time.perf_counter() - started)

    def _serve(self, pipe: GeneratorPipeline, card: dict | None, uri: str) -> None:
        self.pipe, self.card, self.checkpoint = pipe, card, uri
        self.last_error = "" if uri == self.requested else self.last_error
        self.degraded_gauge.set(0 if uri == self.requested else 1, tags={"model": self.name})
        fid, floor = ((card or {}).get(k, {}).get("fid") for k in ("metrics", "floor"))
        tags = {"model": self.name, "model_version": pipe.version, "role": self.role}
        for metric, value in (("fid", fid), ("floor", floor), ("fid_over_floor", fid / floor if fid and floor else None)):
            if isinstance(value, (int, float)):
                self.quality.set(float(value), tags={**tags, "metric": metric})

    def _fall_back(self, reason: str) -> None:
        """A new replica (restart, scale-up, another node) whose configured checkpoint does not load serves the
        last one that loaded and passed its test run on any replica of this model; with none, it fails."""
        good = lkg.recall(self.lkg_key) if self.role == "current" else None  # a candidate never falls back
        if not good or good.get("checkpoint") in (None, self.requested):
            raise RuntimeError(f"model {self.name}: {reason}; no last-known-good checkpoint to fall back to")
        try:
            pipe, card = self._load(good["checkpoint"])
        except Exception as err:
            raise RuntimeError(f"model {self.name}: {reason}; the last known good {good['checkpoint']!r} failed too "
                               f"({type(err).__name__}: {str(err)[:300]})") from None
        self._serve(pipe, card, good["checkpoint"])
        logger.warning("model %s: %s; fell back to the last known good %s", self.name, reason, good["checkpoint"])

    @staticmethod
    def _load(uri: str) -> tuple[GeneratorPipeline, dict | None]:
        if not uri:
            raise ValueError("user_config.checkpoint is empty")
        import torch

        with storage.localized(uri) as local:  # a downloaded copy goes once the weights are in memory
            from aigc_ray.models.text_checkpoint import is_text_checkpoint

            if is_text_checkpoint(local):  # a language model: served by complete / complete_stream
                from aigc_ray.text_pipeline import SamplingSettings, TextPipeline

                pipe = TextPipeline.from_checkpoint(local, "cuda" if torch.cuda.is_available() else "cpu")
                pipe.complete("a", SamplingSettings(max_new_tokens=1))  # the test run
                return pipe, read_card(local)
            # a replica given a GPU (replica_gpus) sees it; any other sees none
            pipe = GeneratorPipeline.from_checkpoint(local, "cuda" if torch.cuda.is_available() else "cpu")
            card = read_card(local)
        # Check it before it replaces anything: one forward pass through what we will serve.
        if pipe.can_generate:
            pipe.generate([0], [0] if pipe.num_classes else None)
        else:
            pipe.reconstruct(torch.zeros(1, pipe.channels, pipe.image_size, pipe.image_size, dtype=torch.uint8))
        return pipe, card

    def info(self) -> dict[str, Any]:
        p = self.pipe
        if p is None:  # a candidate whose checkpoint did not load
            return {"name": self.name, "version": "", "checkpoint": "", "requested": self.requested, "degraded": True,
                    "last_error": self.last_error, "role": self.role, "card": None}
        if _is_text(p):  # the image fields zero, so every reader of this dict keeps working
            return {"name": self.name, "version": p.version, "family": p.family, "modality": "text",
                    "checkpoint": self.checkpoint, "block_size": p.block_size, "vocab": p.vocab, "image_size": 0,
                    "channels": 0, "num_classes": 0, "latent_dim": 0, "can_generate": False, "can_reconstruct": False,
                    "can_complete": True, "text_streams": dict(self.text), "card": self.card,
                    "requested": self.requested, "degraded": self.checkpoint != self.requested,
                    "last_error": self.last_error, "role": self.role}
        return {"name": self.name, "version": p.version, "family": p.family, "modality": "image",
                "can_complete": False, "checkpoint": self.checkpoint,
                "image_size": p.image_size, "channels": p.channels, "num_classes": p.num_classes,
                "latent_dim": p.latent_dim, "can_generate": p.can_generate, "can_reconstruct": p.can_reconstruct,
                "card": self.card, "requested": self.requested, "degraded": self.checkpoint != self.requested,
                "last_error": self.last_error, "role": self.role}

    def check_health(self) -> None:
        if self.pipe is None and self.role == "current":
            raise RuntimeError(f"model {self.name}: no checkpoint loaded")

    # ---- generation ----------------------------------------------------------------------------

    async def generate(self, seeds: list[int], labels: list[int] | None) -> dict[str, Any]:
        """PNGs for `seeds`; all from one model version even if a swap lands mid-request."""
        started = time.perf_counter()
        if self.pipe is None:
            raise RuntimeError(f"model {self.name} (candidate): no checkpoint loaded: {self.last_error}")
        for _ in range(3):
            pipe = self.pipe
            self._not_text(pipe)
            try:
                checked = pipe.check_labels(labels, seeds)
            except PipelineError as err:
                raise BadRequest(str(err)) from None
            if not pipe.can_generate:
                raise BadRequest(f"model: {self.name} ({pipe.family}) is a plain autoencoder; use /v1/reconstruct")
            label_list = None if checked is None else checked.tolist()
            n = self.max_batch_images
            chunks = [{"seeds": seeds[i:i + n], "labels": None if label_list is None else label_list[i:i + n]}
                      for i in range(0, len(seeds), n)]
            parts = await asyncio.gather(*(self._generate_batch(c) for c in chunks))
            if any(isinstance(p, Exception) for p in parts) or len({v for v, _, _ in parts}) > 1:
                continue  # a swap landed between chunks (or changed the label rules): redo on the new model
            version = parts[0][0]
            images = [img for _, imgs, _ in parts for img in imgs]
            total_ms = (time.perf_counter() - started) * 1e3
            self.latency_ms.observe(total_ms, tags={"model": self.name, "model_version": version, "op": "generate"})
            forward_ms, png_ms = (sum(t[k] for _, _, t in parts) for k in ("forward", "png"))
            # where the time went inside this replica (the ingress turns it into a Server-Timing header)
            timing = {"model": total_ms, "forward": forward_ms, "png": png_ms,
                      "batch_wait": max(0.0, total_ms - forward_ms - png_ms)}
            return {"model": self.name, "model_version": version, "seeds": seeds, "images": images, "timing_ms": timing}
        err = next((p for p in parts if isinstance(p, Exception)), None)
        raise BadRequest(str(err)) if err else RuntimeError("model swapped repeatedly during the request")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _generate_batch(self, items: list[dict]) -> list[Any]:
        pipe = self.pipe  # one model for the whole batch, even if reconfigure() swaps meanwhile
        seeds = [s for it in items for s in it["seeds"]]
        labels = None if items[0]["labels"] is None else [y for it in items for y in it["labels"]]
        try:  # forward pass and PNG encoding in one worker thread: the event loop stays free to queue requests
            out = await asyncio.to_thread(_forward_and_encode, pipe, items, seeds, labels)
        except PipelineError as err:  # label rules changed under a swap: the caller retries
            return [BadRequest(str(err))] * len(items)
        tags = {"model": self.name, "model_version": pipe.version}
        self.batch_images.observe(len(seeds), tags=tags)
        self.images_total.inc(len(seeds), tags=tags)
        return out

    async def generate_array(self, seeds: list[int], labels: list[int] | None) -> dict[str, Any]:
        """Like generate, but the images as one uint8 (N, C, H, W) array in .npy bytes."""
        import io

        result = await self.generate(seeds, labels)
        arr = np.stack([decode_png(p).numpy() for p in result.pop("images")])
        buf = io.BytesIO()
        np.save(buf, arr)
        return {**result, "npy": buf.getvalue()}

    async def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | None) -> dict[str, Any]:
        pipe = self.pipe
        self._not_text(pipe)
        try:
            images = await asyncio.to_thread(pipe.interpolate, seed_a, seed_b, steps, label)
        except PipelineError as err:
            raise BadRequest(str(err)) from None
        text = png_text(pipe.version, None, label)
        text["Interpolation"] = f"seed {seed_a} -> seed {seed_b}, {steps} steps"
        return {"model": self.name, "model_version": pipe.version, "seeds": [seed_a, seed_b],
                "images": [encode_png(img, text) for img in images]}

    async def reconstruct(self, pngs: list[bytes]) -> dict[str, Any]:
        pipe = self.pipe
        self._not_text(pipe)
        if not pipe.can_reconstruct:
            raise BadRequest(f"model: {self.name} ({pipe.family}) has no encoder; reconstruct needs a vae or ae model")
        for i, data in enumerate(pngs):  # header only: nothing is inflated before its size is known to be right
            try:
                check_png(data, pipe.image_size, pipe.channels)
            except BadImage as err:
                raise BadRequest(f"images[{i}]: {err}") from None
        batch = await asyncio.to_thread(_decode_pngs, pngs, pipe.channels)  # (N, C, H, W) uint8, off the event loop
        try:
            out = await asyncio.to_thread(pipe.reconstruct, batch)
        except PipelineError as err:
            raise BadRequest(f"images: {err}") from None
        return {"model": self.name, "model_version": pipe.version, "seeds": [],
                "images": [encode_png(img, png_text(pipe.version)) for img in out]}


    # ---- text ------------------------------------------------------------------------------------

    def _not_text(self, pipe) -> None:
        if _is_text(pipe):
            raise BadRequest(f"model: {self.name} is a text model ({pipe.family}); use POST /v1/complete")

    def _text_pipe(self):
        pipe = self.pipe
        if pipe is None:
            raise RuntimeError(f"model {self.name} (candidate): no checkpoint loaded: {self.last_error}")
        if not _is_text(pipe):
            raise BadRequest(f"model: {self.name} is an image model ({pipe.family}); /v1/complete needs a text "
                             "model (GET /v1/models: modality)")
        return pipe

    async def complete_stream(self, prompt: str, settings: dict):
        """Server streaming: a header {model, model_version, seed}, then {"text": piece} per piece, then a done
        item (serving/text.py). One model version for the whole stream, even if a swap lands meanwhile."""
        from aigc_ray.serving.text import token_stream

        pipe = self._text_pipe()
        def observe(n: int, finished: bool) -> None:
            if n:
                self.text_tokens.inc(n, tags={"model": self.name, "outcome": "done" if finished else "cancelled"})
        async for item in token_stream(pipe, self.name, prompt, settings, self.text, observe):
            yield item

    async def complete(self, prompt: str, settings: dict) -> dict[str, Any]:
        pieces, last = [], {}
        async for item in self.complete_stream(prompt, settings):
            if "text" in item:
                pieces.append(item["text"])
            else:
                last = item
        return {**last, "text": "".join(pieces)}


def _is_text(pipe) -> bool:
    return getattr(pipe, "modality", "image") == "text"


def _forward_and_encode(pipe: GeneratorPipeline, items: list[dict], seeds: list[int], labels: list[int] | None):
    """[(version, [PNG bytes], {"forward": ms, "png": ms of the whole batch})] per item."""
    started = time.perf_counter()
    images = pipe.generate(seeds, labels)  # (N, C, H, W) uint8
    encoded = time.perf_counter()
    pngs, i = [], 0
    for it in items:
        pngs.append([encode_png(images[i + j], png_text(pipe.version, s, None if it["labels"] is None else it["labels"][j]))
                     for j, s in enumerate(it["seeds"])])
        i += len(it["seeds"])
    timing = {"forward": (encoded - started) * 1e3, "png": (time.perf_counter() - encoded) * 1e3}
    return [(pipe.version, p, timing) for p in pngs]


def _decode_pngs(pngs: list[bytes], channels: int):
    """Decode header-checked PNGs: the decoder's buffer is the declared (checked) size, no larger."""
    import torch

    decoded = []
    for i, data in enumerate(pngs):
        try:
            decoded.append(decode_png(data, channels))
        except ValueError as err:  # a corrupt stream after a good header
            raise BadRequest(f"images[{i}]: {err}") from None
    return torch.stack(decoded)


GeneratorModel = serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})(ModelCore)


class LocalModel:
    """The default model inside the ingress replica, called where a handle would be. Its queue is bounded as
    Serve bounds a deployment's (max_ongoing_requests + max_queued_requests): beyond, Full (-> 503)."""

    class Full(Exception):
        pass

    def __init__(self, core: ModelCore, limit: int):
        self.core, self.limit, self.in_flight = core, limit, 0

    async def stream(self, method: str, *args):
        """A streaming method (complete_stream), under the same bound as call."""
        if self.in_flight >= self.limit:
            raise LocalModel.Full
        self.in_flight += 1
        try:
            async for item in getattr(self.core, method)(*args):
                yield item
        finally:
            self.in_flight -= 1

    async def call(self, method: str, *args) -> Any:
        if method == "info":
            return self.core.info()
        if self.in_flight >= self.limit:
            raise LocalModel.Full
        self.in_flight += 1
        try:
            return await getattr(self.core, method)(*args)
        finally:
            self.in_flight -= 1
