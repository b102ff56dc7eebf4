"""gpt: a decoder-only Transformer language model over bytes (nanoGPT's shape, small and readable).

Pre-norm blocks (x + attn(ln(x)), x + mlp(ln(x))), causal self-attention through
F.scaled_dot_product_attention, learned or rotary positions, and an output head tied to the token
embedding (logits = h @ E^T: one matrix, no second copy in the checkpoint). With ``use_cache`` each
layer returns its keys and values, so decoding feeds one new position per step.

Torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigc_ray.models.text_registry import StepGraph, TextFamily, register_text

POSITIONS = ("learned", "rotary")


@dataclass
class GPTOptions:
    heads: int = 4
    """Attention heads; model.width must be a multiple of it."""
    positions: str = "learned"
    """learned (an embedding per position up to model.block_size) | rotary (RoPE on queries and keys)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.heads, int) and 1 <= self.heads <= 64):
            raise ValueError(f"model.options.heads must be an integer in 1..64, got {self.heads!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"model.options.positions={self.positions!r}: use one of {POSITIONS}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, T, D) with cos/sin (T, D/2): each pair of channels turned by its position's angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, rope, cache):
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, D)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:  # the keys/values of the positions before these: (B, H, S_past, D)
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        past = k.shape[2] - T
        if past == 0:  # prompt or training: plain causal
            mask, causal = None, T > 1
        elif T == 1:  # one new position sees every cached one
            mask, causal = None, False
        else:  # several new positions after a cache: position i sees past + i + 1 keys
            mask, causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, cache):
        a, kv = self.attn(self.ln1(x), rope, cache)
        x = x + self.drop(a)
        return x + self.mlp(self.ln2(x)), kv


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, width: int, depth: int, heads: int, dropout: float,
                 positions: str):
        super().__init__()
        self.vocab_size, self.block_size, self.rotary = vocab_size, block_size, positions == "rotary"
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = None if self.rotary else nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        if self.rotary:  # angles per position and channel pair; not weights, so not in the checkpoint
            d = width // heads
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            angles = torch.outer(torch.arange(block_size).float(), inv)  # (block_size, D/2)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * depth))

    @property
    def max_context(self) -> int:
        return self.block_size

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, state=None, use_cache: bool = False):
        B, T = tokens.shape
        start = 0 if state is None else state[0][0].shape[2]  # positions already in the cache
        if start + T > self.block_size:
            raise ValueError(f"{start + T} positions exceed the model's block size {self.block_size}")
        x = self.tok(tokens)  # (B, T, C)
        rope = None
        if self.rotary:
            rope = (self.cos[start:start + T], self.sin[start:start + T])
        else:
            x = x + self.pos(torch.arange(start, start + T, device=tokens.device))
        x = self.drop(x)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rope, None if state is None else state[i])
            new_state.append(kv)
        logits = F.linear(self.ln_f(x), self.tok.weight)  # tied head: (B, T, vocab)
        return logits, (new_state if use_cache else None)


class GPTStep(nn.Module):
    """One decoding step of a GPT with its keys/values as plain tensors in and out, and an explicit attention
    mask, so one traced graph serves the prefill (P = 0 cached, T = prompt) and each later step (T = 1): GPT's
    own forward picks its attention call by Python branches on the shapes, which tracing would freeze to the
    one branch of the example.

        tokens (B, T), position (1,) = positions already cached, past_key_i / past_value_i (B, H, P, D)
        -> logits (B, T, vocab), present_key_i / present_value_i (B, H, P + T, D)
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt  # registered, so the exporter sees its weights

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *past: torch.Tensor):
        g = self.gpt
        T = tokens.shape[1]
        pos = position + torch.arange(T, device=tokens.device)  # (T,): the absolute positions fed now
        x = g.tok(tokens)
        rope = (g.cos[pos], g.sin[pos]) if g.rotary else None
        if not g.rotary:
            x = x + g.pos(pos)
        presents = []
        for i, block in enumerate(g.blocks):
            a, k, v = _attend_after(block.attn, block.ln1(x), rope, past[2 * i], past[2 * i + 1])
            x = x + a
            x = x + block.mlp(block.ln2(x))
            presents += [k, v]
        logits = F.linear(g.ln_f(x), g.tok.weight)  # the tied head, as in GPT.forward
        return (logits, *presents)


def _attend_after(attn: CausalSelfAttention, x: torch.Tensor, rope, past_k: torch.Tensor, past_v: torch.Tensor):
    """CausalSelfAttention.forward for any number of new positions after any number of cached ones."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.heads, C // attn.heads).transpose(1, 2) for t in attn.qkv(x).split(C, dim=2))
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    total = k.shape[2]
    # new position i (absolute total - T + i) sees every key up to itself
    mask = torch.arange(total, device=x.device)[None, :] <= (total - T) + torch.arange(T, device=x.device)[:, None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, T, C)), k, v


@register_text
class GPTFamily(TextFamily):
    name = "gpt"
    summary = "decoder-only Transformer (pre-norm, causal SDPA, learned or rotary positions, tied head)"
    Options = GPTOptions

    def build(self, cfg) -> nn.Module:
        o = cfg.opts
        return GPT(cfg.vocab_size, cfg.block_size, cfg.width, cfg.depth, o.heads, cfg.dropout, o.positions)

    def step_graph(self, net: GPT) -> StepGraph:
        depth, attn, width = len(net.blocks), net.blocks[0].attn, net.tok.weight.shape[1]
        head = width // attn.heads
        state_in = [f"past_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
        state_out = [f"present_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
        example = (torch.randint(0, net.vocab_size, (1, 2)), torch.tensor([3]),
                   *(torch.randn(1, attn.heads, 3, head) for _ in state_in))
        axes = {"tokens": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}}
        axes |= {n: {0: "batch", 2: "past"} for n in state_in} | {n: {0: "batch", 2: "total"} for n in state_out}
        return StepGraph(GPTStep(net), example, ["tokens", "position", *state_in], ["logits", *state_out], axes,
                         {n: [-1, attn.heads, 0, head] for n in state_in})

    def check(self, cfg) -> None:
        if cfg.width % cfg.opts.heads:
            raise ValueError(f"model.width={cfg.width} is not a multiple of model.options.heads={cfg.opts.heads}")
        if cfg.opts.positions == "rotary" and (cfg.width // cfg.opts.heads) % 2:
            raise ValueError("model.options.positions=rotary needs an even width per head (model.width / heads)")
