"""Export a text checkpoint (gpt, rnn-lm) as ONNX: the graph of ONE decoding step with its state.

`aigc-ray export --checkpoint TEXT_CKPT --format onnx --out model.onnx` comes here (aigc_ray/export.py hands
text checkpoints over). The step graph is what a decoder calls once per new position, so an embedded runner
(aigc_ray/text_onnx.py: numpy + onnxruntime, no torch) decodes with the same cache the server keeps:

    gpt     tokens int64 (B, T), position int64 (1,) = positions already in the cache,
            past_key_i / past_value_i float32 (B, H, P, D) per layer i (P may be 0: the prompt's prefill)
            -> logits float32 (B, T, 256), present_key_i / present_value_i (B, H, P + T, D)
    rnn-lm  tokens int64 (B, T), hidden float32 (depth, B, W) [, cell for an lstm]
            -> logits float32 (B, T, 256), hidden_out [, cell_out]

Each family's step module, names, example and empty state are its registered object's ``step_graph``
(aigc_ray/models/gpt.py, rnn_lm.py); this module writes whichever it is given. B, T and P are dynamic axes;
a gpt's position + T must stay within its block size (max_context in the metadata: the position tables end
there, as in the model), which the runner keeps by rebuilding its cache.
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

from torch import nn

from aigc_ray.export import OPSET, write_onnx

STEP_GRAPH = "step"


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
    from aigc_ray.models.text_registry import get_text_family

    model, meta = load_text_model(local)
    family = meta["model"]["family"]
    step = get_text_family(family).step_graph(model)
    md = {"format": export_format, "modality": "text", "model_version": text_model_version(local),
          "family": family, "graph": STEP_GRAPH, "opset": OPSET,
          "vocab": json.dumps(meta["vocab"]), "model_config": json.dumps(meta["model"]),
          "state_inputs": json.dumps(step.state_inputs), "state_outputs": json.dumps(step.outputs[1:]),
          "state_shapes": json.dumps(step.state_shapes),
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
        _write_onnx(step.module, step.example, step.inputs, step.outputs, step.axes, md, tmp)
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
