"""How good a language model is, measured honestly: validation bits per byte with a 95% interval, beside
n-gram baselines fitted on the same training split and scored on the same validation positions.

The validation split is cut into contiguous, non-overlapping blocks of ``block_size`` + 1 bytes; a model
predicts bytes 1..block_size of each block from the ones before it in the block (no context across blocks),
and a baseline predicts the same positions. A number is the mean over blocks of each block's mean
bits/byte, with a Student-t 95% interval over blocks (blocks are the independent-ish unit; bytes are not).

Baselines are interpolated Witten-Bell n-grams over the 256 byte values (no tuned constant, nothing fitted
on validation): order 1 = unigram (add-one), order 2 = bigram, higher orders for the bench.

The card (``text_card``, format aigc-ray-text-card/1; the one writer of a text card's fields) keeps each
block's value, so two models scored on the same blocks can be compared pair by pair (aigc_ray/promotion.py).
No Ray; torch only where a model is scored (imported there, so the card and interval helpers stay light).
"""

from __future__ import annotations

import math

import numpy as np

VOCAB = 256
LN2 = math.log(2)
TEXT_CARD_FORMAT = "aigc-ray-text-card/1"
PROTOCOL_FIELDS = ("dataset_hash", "split", "block_size", "max_blocks", "blocks")  # the same blocks = comparable


def interval(per_block: np.ndarray) -> dict:
    """{"mean", "lo", "hi", "blocks"}: the mean of per-block values and its 95% t-interval."""
    n = len(per_block)
    mean = float(np.mean(per_block))
    if n < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "blocks": n}
    try:
        from scipy.stats import t

        q = float(t.ppf(0.975, n - 1))
    except ImportError:  # scipy comes with scikit-learn; the normal quantile is close for many blocks
        q = 1.96
    half = q * float(np.std(per_block, ddof=1)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "blocks": n}


def block_starts(n_tokens: int, block_size: int, max_blocks: int = 0) -> np.ndarray:
    """Start offsets of the validation blocks (each block_size + 1 bytes), evenly spaced if capped."""
    n = max(0, (n_tokens - 1) // block_size)
    starts = np.arange(n) * block_size
    if max_blocks and n > max_blocks:
        starts = starts[np.linspace(0, n - 1, max_blocks).round().astype(int)]
    return starts


class NGram:
    """An interpolated Witten-Bell byte n-gram of ``order`` (1 = unigram with add-one smoothing)."""

    def __init__(self, train: np.ndarray, order: int):
        if not 1 <= order <= 7:  # a context of up to 6 bytes + the byte fit one int64 key
            raise ValueError("n-gram order must be in 1..7")
        self.order = order
        t = np.asarray(train, dtype=np.int64)
        self.tables = []  # per context length j: (sorted keys, c(h,w)), (sorted contexts, c(h), distinct w after h)
        for j in range(order):
            full = _keys(t, j, j + 1)
            keys, counts = np.unique(full, return_counts=True)
            ctx, first = np.unique(keys // VOCAB, return_index=True)
            ctx_counts = np.add.reduceat(counts, first)
            types = np.diff(np.append(first, len(keys)))
            self.tables.append((keys, counts, ctx, ctx_counts, types))

    def bits(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """-log2 P(tokens[p] | the bytes before p) for each p in positions (p >= 1)."""
        t = np.asarray(tokens, dtype=np.int64)
        p = np.full(len(positions), 1.0 / VOCAB)
        for j, (keys, counts, ctx, ctx_counts, types) in enumerate(self.tables):
            ok = positions >= j
            pos = positions[ok]
            full = np.zeros(len(pos), dtype=np.int64)
            for i in range(j + 1):  # bytes p-j .. p, most significant first
                full = full * VOCAB + t[pos - j + i]
            c_hw = _lookup(keys, counts, full)
            c_h = _lookup(ctx, ctx_counts, full // VOCAB)
            n_types = _lookup(ctx, types, full // VOCAB)
            if j == 0:  # the unigram: add-one over the byte values
                new = (c_hw + 1.0) / (c_h + VOCAB)
            else:
                new = np.where(c_h > 0, (c_hw + n_types * p[ok]) / np.maximum(c_h + n_types, 1), p[ok])
            p[ok] = new
        return -np.log2(p)


def _keys(t: np.ndarray, j: int, width: int) -> np.ndarray:
    """Integer keys of every window of ``width`` bytes in t (for context length j = width - 1)."""
    n = len(t) - j
    out = np.zeros(n, dtype=np.int64)
    for i in range(width):
        out = out * VOCAB + t[i:i + n]
    return out


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(sorted_keys, query).clip(0, max(len(sorted_keys) - 1, 0))
    hit = sorted_keys[idx] == query if len(sorted_keys) else np.zeros(len(query), bool)
    return np.where(hit, values[idx], 0).astype(np.float64)


def ngram_block_bits(train: np.ndarray, val: np.ndarray, block_size: int, order: int, max_blocks: int = 0) -> np.ndarray:
    """An n-gram's mean bits per byte on each validation block (n_blocks,)."""
    starts = block_starts(len(val), block_size, max_blocks)
    positions = (starts[:, None] + np.arange(1, block_size + 1)[None, :]).reshape(-1)
    return NGram(train, order).bits(val, positions).reshape(len(starts), block_size).mean(axis=1)


def ngram_bpb(train: np.ndarray, val: np.ndarray, block_size: int, order: int, max_blocks: int = 0) -> dict:
    """An n-gram baseline's bits per byte on the validation blocks, with its interval."""
    return interval(ngram_block_bits(train, val, block_size, order, max_blocks))


def baselines(train: np.ndarray, val: np.ndarray, block_size: int, max_blocks: int = 0,
              orders: dict[str, int] | None = None) -> dict:
    orders = orders or {"unigram": 1, "bigram": 2}
    return {name: ngram_bpb(train, val, block_size, n, max_blocks) for name, n in orders.items()}


def model_block_bits(model, val: np.ndarray, block_size: int, device, max_blocks: int = 0,
                     batch: int = 64) -> np.ndarray:
    """The model's mean bits per byte on each validation block (n_blocks,), in eval mode."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    starts = block_starts(len(val), block_size, max_blocks)
    tokens = torch.from_numpy(np.asarray(val, dtype=np.int64))
    per_block = []
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            idx = torch.from_numpy(starts[i:i + batch])[:, None] + torch.arange(block_size + 1)[None, :]
            windows = tokens[idx].to(device)  # (b, block_size + 1)
            logits, _ = model(windows[:, :-1])  # (b, T, vocab)
            nats = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")  # (b, T)
            per_block.append((nats.mean(dim=1) / LN2).cpu().numpy())
    model.train(was_training)
    return np.concatenate(per_block) if per_block else np.zeros(0)


def model_bpb(model, val: np.ndarray, block_size: int, device, max_blocks: int = 0) -> dict:
    """The model's bits per byte on the validation blocks, with its interval."""
    return interval(model_block_bits(model, val, block_size, device, max_blocks))


def text_card(per_block: np.ndarray, floor: dict, *, dataset_hash: str, block_size: int, max_blocks: int,
              sample: dict | None = None) -> dict:
    """A text model's quality card: validation bits/byte (mean and 95% interval over blocks) and every block's
    value, the n-gram baselines on the same blocks, the protocol that names those blocks, and a sample."""
    score = interval(np.asarray(per_block, dtype=np.float64))
    card = {"format": TEXT_CARD_FORMAT, "modality": "text", "metric": "val_bpb", "lower_is_better": ["val_bpb"],
            "metrics": {"val_bpb": score["mean"], "val_bpb_lo": score["lo"], "val_bpb_hi": score["hi"]},
            "per_block": {"val_bpb": [float(v) for v in per_block]},
            "baselines": {name: {"val_bpb": b["mean"], "val_bpb_lo": b["lo"], "val_bpb_hi": b["hi"]}
                          for name, b in floor.items()},
            # dataset_hash + block_size + max_blocks fix the blocks (block_starts); blocks counts them
            "protocol": {"dataset_hash": dataset_hash, "split": "validation", "blocks": score["blocks"],
                         "block_size": block_size, "max_blocks": max_blocks, "unit": "bits per byte (UTF-8)",
                         "interval": "95% Student-t over validation blocks"}}
    if sample is not None:
        card["sample"] = sample
    return card


def paired_block_difference(served: list[float], candidate: list[float]) -> dict:
    """Candidate minus served, block by block (the same blocks), as interval(): negative = the candidate is
    better. Pairing cancels what a block's difficulty adds to both, so the interval is much narrower than
    either model's own."""
    if len(served) != len(candidate):
        raise ValueError(f"per_block: {len(served)} served blocks vs {len(candidate)} candidate blocks")
    return interval(np.asarray(candidate, dtype=np.float64) - np.asarray(served, dtype=np.float64))
