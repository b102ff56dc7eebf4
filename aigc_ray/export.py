"""Export a checkpoint for embedded, offline use: ONNX (for onnxruntime) or TorchScript.

Works from the checkpoint alone (no Ray, no training code): the graphs trace
aigc_ray.pipeline.GeneratorPipeline, so an exported model computes what the server computes.

Graphs (the batch dimension, named "batch", is free in both formats):
    generate     z float32 (N, latent_dim) [, labels int64 (N,) when class-conditional]
                 -> images uint8 (N, C, S, S)
    encode       images uint8 (N, C, S, S) -> z float32 (N, latent_dim), the encoder's mean
    reconstruct  images uint8 (N, C, S, S) -> images uint8 (N, C, S, S)

z comes from aigc_ray.latents (rule `aigc-latents/1`, named in the metadata), so seeds map to
the same images offline as on the server. Metadata (ONNX metadata_props; the TorchScript
archive's extra file `aigc_ray.json`) carries the model version, family, sizes, class count,
graph, opset and the checkpoint's quality card as JSON (`{}` when the checkpoint has none).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from aigc_ray import storage
from aigc_ray.latents import RULE as LATENT_RULE
from aigc_ray.models.checkpoint import read_card
from aigc_ray.pipeline import GeneratorPipeline

FORMATS = ("onnx", "torchscript")
GRAPHS = ("generate", "encode", "reconstruct")
OPSET = 17  # onnxruntime >= 1.14 runs it; every op these graphs use exists there
EXPORT_FORMAT = "aigc-ray-export/1"
TORCHSCRIPT_META = "aigc_ray.json"


class ExportError(ValueError):
    """This checkpoint, graph or format can't be exported; the message names which and why."""


class _Generate(nn.Module):
    """z (N, latent_dim) -> uint8 images, through the pipeline's own decode."""

    def __init__(self, pipe: GeneratorPipeline):
        super().__init__()
        self.pipe, self.model = pipe, pipe.model  # model registered so tracing sees its weights

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode(z)


class _GenerateConditional(_Generate):
    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode(z, labels)


class _Encode(_Generate):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe.encode(images)


class _Reconstruct(_Generate):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe.reconstruct(images)


def _graph(pipe: GeneratorPipeline, graph: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """The module to trace, example inputs (batch 2), input names, output names."""
    if graph == "generate":
        if not pipe.can_generate:
            raise ExportError(f"graph: model {pipe.version} ({pipe.family}) can't generate (it has no prior to "
                              "sample from); export --graph reconstruct or --graph encode")
        z = pipe.latents([0, 1])
        if pipe.num_classes:
            labels = torch.tensor([0, 1 % pipe.num_classes])
            return _GenerateConditional(pipe), (z, labels), ["z", "labels"], ["images"]
        return _Generate(pipe), (z,), ["z"], ["images"]
    if graph not in ("encode", "reconstruct"):
        raise ExportError(f"graph: {graph!r} is not one of {', '.join(GRAPHS)}")
    if not pipe.can_reconstruct:
        raise ExportError(f"graph: model {pipe.version} ({pipe.family}) has no encoder; "
                          f"{graph} needs a vae or ae checkpoint")
    images = torch.randint(0, 256, (2, pipe.channels, pipe.image_size, pipe.image_size), dtype=torch.uint8)
    if graph == "encode":
        return _Encode(pipe), (images,), ["images"], ["z"]
    return _Reconstruct(pipe), (images,), ["images"], ["images_out"]


def export_metadata(pipe: GeneratorPipeline, graph: str, fmt: str, card: dict | None) -> dict[str, str]:
    """What an exported file says about itself (all values strings, as ONNX metadata_props wants)."""
    meta = {"format": EXPORT_FORMAT, "model_version": pipe.version, "family": pipe.family, "graph": graph,
            "image_size": pipe.image_size, "channels": pipe.channels, "latent_dim": pipe.latent_dim,
            "num_classes": pipe.num_classes, "latent_rule": LATENT_RULE, "quality_card": json.dumps(card or {})}
    if fmt == "onnx":
        meta["opset"] = OPSET
    return {k: str(v) for k, v in meta.items()}


def export_checkpoint(checkpoint: str, fmt: str, out: str | Path, graph: str | None = None) -> dict[str, str]:
    """Write the checkpoint's `graph` (default: generate; a text checkpoint's: its decoding step) as `fmt` to
    `out` (temp file + rename); return its metadata."""
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if not storage.is_uri(checkpoint) and not Path(checkpoint).is_dir():
        raise ExportError(f"checkpoint: {checkpoint} is not a directory")
    with storage.localized(checkpoint) as local:  # (the weights are in memory after this block)
        from aigc_ray.models.text_checkpoint import is_text_checkpoint

        if is_text_checkpoint(local):  # a language model: its own graph and metadata (aigc_ray/text_export.py)
            from aigc_ray.text_export import export_text_checkpoint

            return export_text_checkpoint(local, fmt, out, graph, EXPORT_FORMAT)
        graph = graph or "generate"
        if graph not in GRAPHS:
            raise ExportError(f"graph: {graph!r} is not one of {', '.join(GRAPHS)}"
                              + (" (step is a text checkpoint's graph)" if graph == "step" else ""))
        pipe = GeneratorPipeline.from_checkpoint(local)
        card = read_card(local)
    module, example, inputs, outputs = _graph(pipe, graph)
    meta = export_metadata(pipe, graph, fmt, card)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # the TorchScript tracer and legacy exporter warn of their deprecation
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _write_onnx(module, example, inputs, outputs, meta, tmp)
            else:
                # frozen: weights become constants, so outputs need no grad and BatchNorm folds away
                traced = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
                torch.jit.save(traced, tmp, _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return meta


def _write_onnx(module: nn.Module, example: tuple, inputs: list[str], outputs: list[str],
                meta: dict[str, str], path: str) -> None:
    # static graphs (no data-dependent control flow): the batch axis is the only dynamic one
    write_onnx(module, example, path, inputs, outputs, {name: {0: "batch"} for name in inputs + outputs}, meta,
               f"aigc-ray {meta['family']} {meta['graph']} graph, model {meta['model_version']}; "
               f"inputs {', '.join(inputs)}; latents by rule {LATENT_RULE}")


def write_onnx(module: nn.Module, example: tuple, path: str, inputs: list[str], outputs: list[str],
               dynamic_axes: dict, meta: dict[str, str], doc: str) -> None:
    """Trace ``module`` on ``example`` into an ONNX file at ``path`` with ``meta`` as its metadata_props,
    checked by onnx's checker (the image graphs here and the text decoding step, aigc_ray/text_export.py)."""
    import onnx

    # dynamo=False: the TorchScript-based exporter; the dynamo one needs onnxscript, not installed here
    with torch.no_grad():
        torch.onnx.export(module.eval(), example, path, dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic_axes)
    model = onnx.load(path)
    onnx.helper.set_model_props(model, meta)
    model.doc_string = doc
    onnx.checker.check_model(model)
    onnx.save(model, path)


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported ONNX or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    files = {TORCHSCRIPT_META: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_META])
