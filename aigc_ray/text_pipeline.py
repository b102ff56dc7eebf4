"""Decoding a text checkpoint, no Ray: prompt -> sampled bytes -> UTF-8 text, token by token.

One new position per step: the prompt is fed once (prefill), then each sampled byte is fed alone with the
model's state (a Transformer's key/value cache, an RNN's hidden state). A learned-position Transformer holds
at most block_size positions: when its cache is full it is rebuilt from the last block_size / 2 bytes (a
prefill every block_size / 2 tokens, the one exception to one-position steps).

Same checkpoint + prompt + settings + seed -> the same text: sampling draws from a torch.Generator seeded by
the request, on the CPU, one request at a time.

The vocabulary is the 256 byte values, so every prompt is in vocabulary (its UTF-8 bytes); the output is
decoded incrementally and a byte sequence that is not valid UTF-8 comes out as U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

EMPTY_PROMPT = b"\n"  # a decoder needs one position to start from


@dataclass
class SamplingSettings:
    max_new_tokens: int = 200
    """Bytes to generate at most."""
    temperature: float = 1.0
    """Logits divided by this; 0 = greedy (always the likeliest byte)."""
    top_k: int = 0
    """Sample among the k likeliest bytes only (0 = all)."""
    top_p: float = 1.0
    """Sample among the likeliest bytes whose probabilities add up to p (1 = all)."""
    seed: int = 0
    """Seed of the sampling generator."""
    stop: list[str] = field(default_factory=list)
    """Stop (and leave out) at the first of these strings."""


class TextPipeline:
    modality = "text"

    def __init__(self, model: torch.nn.Module, meta: dict, version: str, device: str | torch.device = "cpu"):
        self.model, self.meta, self.version, self.device = model.eval(), meta, version, torch.device(device)
        self.family = meta["model"]["family"]
        self.block_size = meta["model"]["block_size"]
        self.vocab = meta["vocab"]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> TextPipeline:
        from aigc_ray.models.text_checkpoint import load_text_model, text_model_version

        model, meta = load_text_model(path, device)
        return cls(model, meta, text_model_version(path), device)

    @staticmethod
    def encode(prompt: str) -> list[int]:
        return list(prompt.encode("utf-8"))

    def _next(self, logits: torch.Tensor, s: SamplingSettings, gen: torch.Generator) -> int:
        logits = logits.float().cpu()  # (vocab,)
        if s.temperature == 0:
            return int(logits.argmax())
        logits = logits / s.temperature
        if s.top_k and s.top_k < logits.numel():
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the smallest head whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def token_steps(self, prompt_ids: list[int], s: SamplingSettings) -> Iterator[int]:
        """The sampled byte ids, one per step (a generator: stop iterating to stop decoding)."""
        gen = torch.Generator().manual_seed(s.seed)
        limit = self.model.max_context
        ids = list(prompt_ids) or list(EMPTY_PROMPT)
        context = ids[-limit:] if limit else ids
        logits, state = self._forward([context])
        held = len(context)
        for _ in range(s.max_new_tokens):
            token = self._next(logits[0, -1], s, gen)
            ids.append(token)
            yield token
            if limit and held >= limit:  # the cache is full: rebuild it from the recent half
                context = ids[-(limit // 2):]
                logits, state = self._forward([context])
                held = len(context)
            else:
                logits, state = self._forward([[token]], state)
                held += 1

    def _forward(self, tokens: list[list[int]], state=None):
        """(1, T) token ids [+ the cache] -> logits (1, T, 256) and the new cache. The inference mode is entered per
        call, not around token_steps' yields: it is thread-local, and Serve resumes the generator on whichever
        executor thread is free (asyncio.to_thread), where a mode entered on another thread would not hold (an
        LSTM/GRU step then fails saving an inference tensor for backward)."""
        with torch.inference_mode():
            return self.model(torch.tensor(tokens, device=self.device), state, use_cache=True)

    def stream(self, prompt: str, s: SamplingSettings, progress: dict | None = None) -> Iterator[str]:
        """Text pieces as they are produced (stop strings withheld until they can no longer begin one).
        ``progress`` (optional) is kept up to date: {"tokens": bytes sampled, "finish_reason": length | stop}."""
        progress = {} if progress is None else progress
        progress.update(tokens=0, finish_reason="length")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, hold = "", max((len(x) for x in s.stop), default=1) - 1
        for token in self.token_steps(self.encode(prompt), s):
            progress["tokens"] += 1
            pending += decoder.decode(bytes([token]))
            hits = [pending.find(x) for x in s.stop if x and x in pending]
            if hits:
                progress["finish_reason"] = "stop"
                if pending[:min(hits)]:
                    yield pending[:min(hits)]
                return
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending

    def complete(self, prompt: str, s: SamplingSettings) -> str:
        return "".join(self.stream(prompt, s))
