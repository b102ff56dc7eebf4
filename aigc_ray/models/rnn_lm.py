"""rnn-lm: a GRU or LSTM language model over bytes, the recurrent baseline beside gpt.

Embedding -> stacked GRU/LSTM -> LayerNorm -> head tied to the embedding. Its state (the hidden state,
and the LSTM's cell) is what decoding carries, so each new token costs one step whatever came before.

Torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aigc_ray.models.text_registry import StepGraph, TextFamily, register_text

CELLS = ("gru", "lstm")


@dataclass
class RNNOptions:
    cell: str = "gru"
    """gru | lstm."""

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"model.options.cell={self.cell!r}: use one of {CELLS}")


class RNNLM(nn.Module):
    max_context = None  # a recurrent state holds any number of positions

    def __init__(self, vocab_size: int, width: int, depth: int, dropout: float, cell: str):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, width)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(width, width, num_layers=depth, batch_first=True, dropout=dropout if depth > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(width)
        nn.init.normal_(self.emb.weight, 0.0, 0.02)

    def forward(self, tokens: torch.Tensor, state=None, use_cache: bool = False):
        out, new_state = self.rnn(self.drop(self.emb(tokens)), state)  # (B, T, W); h (depth, B, W) [, c]
        logits = F.linear(self.ln(self.drop(out)), self.emb.weight)  # tied head: (B, T, vocab)
        return logits, (new_state if use_cache else None)


class RNNStep(nn.Module):
    """One decoding step of an RNNLM with its state as plain tensors in and out:
    tokens (B, T), hidden (depth, B, W) [, cell] -> logits (B, T, vocab), hidden_out [, cell_out]."""

    def __init__(self, net: RNNLM):
        super().__init__()
        self.net = net
        self.lstm = isinstance(net.rnn, nn.LSTM)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor | None = None):
        logits, state = self.net(tokens, (hidden, cell) if self.lstm else hidden, use_cache=True)
        return (logits, *state) if self.lstm else (logits, state)


@register_text
class RNNFamily(TextFamily):
    name = "rnn-lm"
    summary = "GRU or LSTM language model (the recurrent baseline), head tied to the embedding"
    Options = RNNOptions

    def build(self, cfg) -> nn.Module:
        return RNNLM(cfg.vocab_size, cfg.width, cfg.depth, cfg.dropout, cfg.opts.cell)

    def step_graph(self, net: RNNLM) -> StepGraph:
        rnn = net.rnn
        state_in = ["hidden", "cell"] if isinstance(rnn, nn.LSTM) else ["hidden"]
        state_out = [f"{n}_out" for n in state_in]
        example = (torch.randint(0, net.vocab_size, (1, 2)),
                   *(torch.zeros(rnn.num_layers, 1, rnn.hidden_size) for _ in state_in))
        axes = {"tokens": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}}
        axes |= {n: {1: "batch"} for n in state_in + state_out}
        return StepGraph(RNNStep(net), example, ["tokens", *state_in], ["logits", *state_out], axes,
                         {n: [rnn.num_layers, -1, rnn.hidden_size] for n in state_in})

    def check(self, cfg) -> None:
        pass
