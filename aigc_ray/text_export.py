"""Export a text checkpoint (gpt, rnn-lm) as ONNX: the graph of ONE decoding step with its state.

`aigc-ray export --checkpoint TEXT_CKPT --format onnx --out model.onnx` comes here (aigc_ray/export.py hands
text checkpoints over). The step graph is what a decoder calls once per new position, so an embedded runner
(aigc_ray/text_onnx.py: numpy + onnxruntime, no torch) decodes with the same cache the server keeps:

    gpt     tokens int64 (B, T), position int64 (1,) = positions already in the cache,
            past_key_i / past_value_i float32 (B, H, P, D) per layer i (P may be 0: the prompt's prefill)
            -> logits float32 (B, T, 256), present_key_i / present_value_i (B, H, P + T, D)
    rnn-lm  tokens int64 (B, T), hidden float32 (depth, B, W) [, cell for an lstm]
            -> logits float32 (B, T, 256), hidden_out [, cell_out]

B, T and P are dynamic axes; a gpt's position + T must stay within its block size (max_context in the
metadata: the position tables end there, as in the model), which the runner keeps by rebuilding its cache.
The vocabulary and the model config travel in the ONNX metadata_props (JSON
strings), beside the model version, the quality card, the state's input/output names and the decoding rules
the runner must follow to give the server's tokens (the context limit and how the cache is rebuilt at it,
the empty prompt's stand-in).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aigc_ray.export import OPSET, write_onnx

STEP_GRAPH = "step"


class _GPTStep(nn.Module):
    """One step of models/gpt.py's GPT with an explicit attention mask, so one graph serves the prefill (P = 0,
    T = prompt) and each later step (T = 1): the model's own forward picks its attention call by Python
    branches on the shapes, which tracing would freeze to the one branch of the example."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.gpt = gpt  # registered, so the exporter sees its weights

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *past: torch.Tensor):
        g = self.gpt
        B, T = tokens.shape
        pos = position + torch.arange(T, device=tokens.device)  # (T,): the absolute positions fed now
        x = g.tok(tokens)
        rope = (g.cos[pos], g.sin[pos]) if g.rotary else None
        if not g.rotary:
            x = x + g.pos(pos)
        presents = []
        for i, block in enumerate(g.blocks):
            a, k, v = _attend(block.attn, block.ln1(x), rope, past[2 * i], past[2 * i + 1])
            x = x + a
            x = x + block.mlp(block.ln2(x))
            presents += [k, v]
        logits = F.linear(g.ln_f(x), g.tok.weight)  # the tied head, as in GPT.forward
        return (logits, *presents)


def _attend(attn: nn.Module, x: torch.Tensor, rope, past_k: torch.Tensor, past_v: torch.Tensor):
    """CausalSelfAttention.forward for any number of new positions after any number of cached ones."""
    from aigc_ray.models.gpt import _rotate

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


class _RNNStep(nn.Module):
    """One step of models/rnn_lm.py's RNNLM with its state as plain tensors in and out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.lstm = isinstance(net.rnn, nn.LSTM)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor | None = None):
        logits, state = self.net(tokens, (hidden, cell) if self.lstm else hidden, use_cache=True)
        return (logits, *state) if self.lstm else (logits, state)


def step_graph(model: nn.Module, family: str) -> tuple[nn.Module, tuple, list[str], list[str], dict]:
    """The module to trace, example inputs (batch 1, 2 new positions after 3 cached), input names,
    output names and dynamic axes."""
    tokens = torch.randint(0, model.vocab_size, (1, 2))
    axes = {"tokens": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}}
    if family == "gpt":
        depth, attn = len(model.blocks), model.blocks[0].attn
        width = model.tok.weight.shape[1]
        past = [torch.randn(1, attn.heads, 3, width // attn.heads) for _ in range(2 * depth)]
        state_in = [f"past_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
        state_out = [f"present_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
        axes |= {n: {0: "batch", 2: "past"} for n in state_in} | {n: {0: "batch", 2: "total"} for n in state_out}
        return (_GPTStep(model), (tokens, torch.tensor([3]), *past), ["tokens", "position", *state_in],
                ["logits", *state_out], axes)
    if family == "rnn-lm":
        rnn = model.rnn
        state = [torch.zeros(rnn.num_layers, 1, rnn.hidden_size)]
        state_in, state_out = ["hidden"], ["hidden_out"]
        if isinstance(rnn, nn.LSTM):
            state, state_in, state_out = state * 2, ["hidden", "cell"], ["hidden_out", "cell_out"]
        axes |= {n: {1: "batch"} for n in state_in + state_out}
        return _RNNStep(model), (tokens, *state), ["tokens", *state_in], ["logits", *state_out], axes
    raise ValueError(f"model.family: no ONNX step graph for text family {family!r} (have: gpt, rnn-lm)")


def state_spec(model: nn.Module, family: str) -> dict:
    """How the runner builds the empty state: per state input, its shape with -1 for batch and 0 for past."""
    if family == "gpt":
        attn, width = model.blocks[0].attn, model.tok.weight.shape[1]
        return {f"past_{kind}_{i}": [-1, attn.heads, 0, width // attn.heads]
                for i in range(len(model.blocks)) for kind in ("key", "value")}
    rnn = model.rnn
    names = ["hidden", "cell"] if isinstance(rnn, nn.LSTM) else ["hidden"]
    return {n: [rnn.num_layers, -1, rnn.hidden_size] for n in names}


def export_text_checkpoint(local: str | Path, fmt: str, out: str | Path, graph: str | None,
                           export_format: str) -> dict[str, str]:
    """Write the text checkpoint at `local` (a local directory) as the ONNX step graph; return its metadata.
    Formats and graphs that only image checkpoints have are errors naming the field."""
    from aigc_ray.export import ExportError
    from aigc_ray.models.checkpoint import read_card
    from aigc_ray.models.text_checkpoint import load_text_model, text_model_version
    from aigc_ray.text_pipeline import EMPTY_PROMPT

    if fmt != "onnx":
        raise ExportError(f"format: {fmt!r} is for image checkpoints; a text checkpoint exports as onnx "
                          "(its decoding step with the cache)")
    if graph not in (None, STEP_GRAPH):
        raise ExportError(f"graph: {graph!r} is an image graph; a text checkpoint has one graph, {STEP_GRAPH!r} "
                          "(leave --graph out)")
    model, meta = load_text_model(local)
    family = meta["model"]["family"]
    module, example, inputs, outputs, axes = step_graph(model, family)
    state_in = inputs[2:] if family == "gpt" else inputs[1:]
    md = {"format": export_format, "modality": "text", "model_version": text_model_version(local),
          "family": family, "graph": STEP_GRAPH, "opset": OPSET,
          "vocab": json.dumps(meta["vocab"]), "model_config": json.dumps(meta["model"]),
          "state_inputs": json.dumps(state_in), "state_outputs": json.dumps(outputs[1:]),
          "state_shapes": json.dumps(state_spec(model, family)),
          "max_context": "" if model.max_context is None else model.max_context,
          # the rule TextPipeline.token_steps follows when the context is full, and the empty prompt's stand-in
          "context_rule": "rebuild from the last max_context // 2 tokens when the cache holds max_context",
          "empty_prompt": json.dumps(list(EMPTY_PROMPT)), "quality_card": json.dumps(read_card(local) or {})}
    md = {k: str(v) for k, v in md.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        _write_onnx(module, example, inputs, outputs, axes, md, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return md


def _write_onnx(module: nn.Module, example: tuple, inputs: list[str], outputs: list[str], axes: dict,
                md: dict[str, str], path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns of its deprecation and of traced shapes
        write_onnx(module, example, path, inputs, outputs, axes, md,
                   f"aigc-ray {md['family']} decoding step, model {md['model_version']}; inputs "
                   f"{', '.join(inputs)}; outputs {', '.join(outputs)}")
