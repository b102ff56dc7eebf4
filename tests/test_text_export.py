"""Text checkpoints exported as ONNX (one decoding step with its cache) and run with onnxruntime alone
(aigc_ray/text_onnx.py): the same greedy tokens as the PyTorch pipeline, the metadata round trip, bad input.
Tiny random models built from their config: no Ray, no training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import make_checkpoint

from aigc_ray.cli import main as cli_main
from aigc_ray.export import ExportError, export_checkpoint, read_export_metadata
from aigc_ray.models.text_checkpoint import save_text_checkpoint, text_model_version
from aigc_ray.models.text_registry import build_text_model
from aigc_ray.text_config import TextExperimentConfig
from aigc_ray.text_onnx import OnnxTextError, OnnxTextModel, next_token
from aigc_ray.text_pipeline import SamplingSettings, TextPipeline

VARIANTS = [("gpt", {}), ("gpt", {"positions": "rotary"}), ("rnn-lm", {}), ("rnn-lm", {"cell": "lstm"})]
IDS = ["gpt-learned", "gpt-rotary", "gru", "lstm"]
PROMPTS = ["def f(x):\n    return ", "", "héllo → wörld", "x" * 40]  # the last is over the block size (16)


def text_checkpoint(directory: Path, family: str = "gpt", card: dict | None = None, seed: int = 0,
                    **options) -> Path:
    """A tiny random text model saved as a real checkpoint. Weights are spread wider than the init so the
    next-byte distribution is far from flat (greedy decoding does not hinge on rounding) and greedy text is
    not one byte repeated (a random recurrent net falls into a fixed point below std ~0.5)."""
    cfg = TextExperimentConfig.from_dict({"model": {"family": family, "width": 32, "depth": 2, "block_size": 16,
                                                    "options": options}})
    torch.manual_seed(seed)
    model = build_text_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "rnn-lm" and "ln" not in name:
                p.normal_(0, 0.5)
            elif not name.endswith("bias") and "ln" not in name:
                p.normal_(0, 0.1)
    save_text_checkpoint(directory, experiment=cfg, state=model.state_dict(), step=3, epoch=1, dataset={},
                         card=card)
    return directory


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def exported(request, tmp_path_factory):
    family, options = request.param
    tmp = tmp_path_factory.mktemp(IDS[VARIANTS.index(request.param)])
    ckpt = text_checkpoint(tmp / "ckpt", family, card={"modality": "text", "metrics": {"val_bpb": 5.0}}, **options)
    meta = export_checkpoint(str(ckpt), "onnx", tmp / "model.onnx")
    return ckpt, tmp / "model.onnx", meta


def test_onnxruntime_greedy_gives_the_pytorch_tokens(exported):
    ckpt, path, _ = exported
    pipe, model = TextPipeline.from_checkpoint(ckpt), OnnxTextModel(path)
    seen = set()
    for prompt in PROMPTS:  # 60 new bytes: past the block size, so a gpt's cache is rebuilt on the way
        want = list(pipe.token_steps(pipe.encode(prompt), SamplingSettings(max_new_tokens=60, temperature=0)))
        assert model.generate(prompt, 60) == want, prompt
        seen |= set(want)
    assert len(seen) > 2  # not a degenerate model that repeats one byte whatever the prompt
    assert model.complete("def ", 30) == pipe.complete("def ", SamplingSettings(max_new_tokens=30, temperature=0))


def test_the_step_graph_matches_the_model_logits_with_a_free_batch_and_length(exported):
    """Prefill of 5 positions then 3 single steps, batch 2, against the model's full forward."""
    ckpt, path, _ = exported
    net = TextPipeline.from_checkpoint(ckpt).model
    model = OnnxTextModel(path)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full, _ = net(x)
    logits, state = model.step(x[:, :5].numpy(), model.empty_state(2), 0)
    steps = [logits]
    for t in range(5, 8):
        logits, state = model.step(x[:, t:t + 1].numpy(), state, t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full.numpy(), atol=1e-4)


def test_metadata_round_trip(exported):
    ckpt, path, meta = exported
    config = json.loads((ckpt / "config.json").read_text())
    read = read_export_metadata(path)
    assert read == meta
    assert read["modality"] == "text" and read["graph"] == "step" and read["model_version"] == text_model_version(ckpt)
    assert json.loads(read["vocab"]) == config["vocab"] and json.loads(read["model_config"]) == config["model"]
    assert json.loads(read["quality_card"]) == {"modality": "text", "metrics": {"val_bpb": 5.0}}
    runner = OnnxTextModel(path)
    assert runner.config == config["model"] and runner.vocab == config["vocab"]
    assert runner.max_context == (16 if config["model"]["family"] == "gpt" else None)
    graph = onnx.load(str(path)).graph
    names = [i.name for i in graph.input]
    if config["model"]["family"] == "gpt":  # tokens, position, then past key/value per layer
        assert names == ["tokens", "position", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
        assert [o.name for o in graph.output][1:] == ["present_key_0", "present_value_0", "present_key_1",
                                                      "present_value_1"]
        dims = [d.dim_param for d in graph.input[2].type.tensor_type.shape.dim]
        assert dims[0] == "batch" and dims[2] == "past"  # a free batch and cache length
    else:
        assert names == ["tokens", "hidden"] + (["cell"] if "lstm" in json.dumps(config["model"]) else [])
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "tokens"]


def test_the_runner_needs_neither_torch_nor_ray(exported, tmp_path):
    """aigc_ray/text_onnx.py run with torch and ray made unimportable gives the same greedy text."""
    ckpt, path, _ = exported
    blocker = tmp_path / "block"
    blocker.mkdir()
    for name in ("torch", "ray"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} must not be needed offline')\n")
    runner = Path(__file__).resolve().parents[1] / "aigc_ray" / "text_onnx.py"
    code = (f"import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('t', {str(runner)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"print(json.dumps(m.OnnxTextModel({str(path)!r}).generate('def ', 25)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    pipe = TextPipeline.from_checkpoint(ckpt)
    assert json.loads(run.stdout) == list(pipe.token_steps(pipe.encode("def "),
                                                           SamplingSettings(max_new_tokens=25, temperature=0)))


def test_seeded_sampling_is_reproducible_offline_and_filters_as_the_server(tmp_path):
    """Sampling: the same seed gives the same text offline (numpy's generator, not the server's torch one, so
    not the server's text); top_k 1 is greedy; the top_k / top_p filters keep the server's candidates."""
    ckpt = text_checkpoint(tmp_path / "ckpt")
    export_checkpoint(str(ckpt), "onnx", tmp_path / "m.onnx")
    model = OnnxTextModel(tmp_path / "m.onnx")
    a = model.generate("def ", 40, temperature=1.0, seed=5)
    assert a == model.generate("def ", 40, temperature=1.0, seed=5) != model.generate("def ", 40, temperature=1.0,
                                                                                      seed=6)
    assert model.generate("def ", 40, temperature=1.0, top_k=1, seed=5) == model.generate("def ", 40)
    logits = np.random.default_rng(0).normal(0, 2, 256).astype(np.float32)
    rng = np.random.default_rng(1)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {next_token(logits, 1.0, 5, 1.0, rng) for _ in range(300)} <= top5
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs)
    head = set(order[:int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    assert {next_token(logits, 1.0, 0, 0.5, rng) for _ in range(300)} <= head
    with pytest.raises(OnnxTextError, match="top_p"):
        model.generate("x", 3, temperature=1.0, top_p=0.0)


def test_bad_input_names_the_field(tmp_path, capsys):
    ckpt = text_checkpoint(tmp_path / "ckpt")

    def fails(*argv: str) -> str:
        assert cli_main(["export", "--checkpoint", str(ckpt), *argv]) == 2
        return capsys.readouterr().err

    err = fails("--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert "format: 'torchscript' is for image checkpoints" in err and "onnx" in err
    for graph in ("generate", "encode", "reconstruct"):  # image-only graphs
        err = fails("--format", "onnx", "--graph", graph, "--out", str(tmp_path / "m.onnx"))
        assert f"graph: {graph!r} is an image graph" in err and "'step'" in err
    with pytest.raises(ExportError, match="format: 'tflite' is not supported"):
        export_checkpoint(str(ckpt), "tflite", tmp_path / "m.x")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".m*"))  # no partial files
    # the CLI on a text checkpoint: step is the default and the only graph
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--graph", "step",
                     "--out", str(tmp_path / "m.onnx")]) == 0
    assert "exported gpt step graph" in capsys.readouterr().err
    # the text graph on an image checkpoint, and an image graph in the text runner
    gan = make_checkpoint(tmp_path / "gan", "dcgan")
    with pytest.raises(ExportError, match="graph: 'step'.*text checkpoint"):
        export_checkpoint(str(gan), "onnx", tmp_path / "g.onnx", "step")
    export_checkpoint(str(gan), "onnx", tmp_path / "g.onnx")
    with pytest.raises(OnnxTextError, match="not an aigc-ray text step graph"):
        OnnxTextModel(tmp_path / "g.onnx")


@pytest.mark.parametrize(("family", "options"), VARIANTS, ids=IDS)
def test_serving_a_stream_step_by_step_on_other_threads_gives_the_same_text(tmp_path, family, options):
    """Serve (serving/text.py token_stream) resumes the pipeline's generator with asyncio.to_thread, so each
    token may be computed on another thread. torch's inference mode is thread-local: entered around the
    generator's yields, it held on the first thread only, and a GRU step elsewhere failed ("Inference tensors
    cannot be saved for backward"). The same seed gives the same text as one uninterrupted call."""
    import asyncio

    from aigc_ray.serving.text import token_stream

    pipe = TextPipeline.from_checkpoint(text_checkpoint(tmp_path / "ckpt", family, **options))
    settings = {"max_new_tokens": 40, "temperature": 0.8, "seed": 5}

    async def served() -> str:
        counters = {"active": 0, "tokens": 0, "cancelled": 0}
        return "".join([item["text"] async for item in token_stream(pipe, "t", "def ", settings, counters)
                        if "text" in item])

    async def on_many_threads() -> str:  # more threads than steps' worth of luck: each step may land elsewhere
        return "".join(await asyncio.gather(served(), served(), served()))

    texts = asyncio.run(on_many_threads())
    want = pipe.complete("def ", SamplingSettings(**settings))
    assert texts == want * 3
    assert torch.is_grad_enabled()  # nothing left the mode switched on this thread
