"""Export to ONNX / TorchScript: parity with the PyTorch pipeline, metadata, bad input. No Ray.

Checkpoints are tiny randomly initialised models (weights and BatchNorm statistics drawn wide
enough that images use the whole 0..255 range), saved with the real checkpoint writer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aigc_ray.cli import main as cli_main
from aigc_ray.config import ExperimentConfig
from aigc_ray.export import OPSET, ExportError, export_checkpoint, read_export_metadata
from aigc_ray.latents import seed_latents
from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import save_checkpoint, write_card
from aigc_ray.pipeline import GeneratorPipeline

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]

# (case name, family, model overrides, graph)
CASES = [
    ("dcgan", "dcgan", {}, "generate"),
    ("cdcgan", "dcgan", {"num_classes": 3}, "generate"),
    ("wgan-gp", "wgan-gp", {"channels": 3}, "generate"),
    ("seed-recipe", "seed-recipe", {}, "generate"),
    ("vae", "vae", {}, "generate"),
    ("vae-mixture", "vae", {"options": {"prior": "mixture", "mixture_components": 3}}, "generate"),
    ("cvae-mixture", "vae", {"num_classes": 4, "options": {"prior": "mixture", "mixture_components": 2}}, "generate"),
    ("cvae-reconstruct", "vae", {"num_classes": 4, "options": {"prior": "mixture", "mixture_components": 2}},
     "reconstruct"),
    ("cvae-colour", "vae", {"channels": 3, "num_classes": 4,
                            "options": {"prior": "mixture", "mixture_components": 2, "chroma_gain": 2.0}}, "generate"),
    ("vae-colour-reconstruct", "vae", {"channels": 3, "options": {"chroma_gain": 2.0}}, "reconstruct"),
    ("vae-encode", "vae", {}, "encode"),
    ("ae-reconstruct", "ae", {}, "reconstruct"),
    ("vae-reconstruct", "vae", {}, "reconstruct"),
]


def make_checkpoint(directory: Path, family: str, card: dict | None = None, **model) -> Path:
    """A tiny random model of `family` saved as a real checkpoint (8x8 or 16x16, latent 8)."""
    fields = {"family": family, "image_size": 16 if family == "seed-recipe" else 8, "latent_dim": 8, **model}
    if family != "seed-recipe":
        fields.setdefault("width", 8)
    fields["channels"] = fields.get("channels", 1)
    cfg = ExperimentConfig.from_dict({"data": {"image_size": fields["image_size"], "channels": fields["channels"]},
                                      "model": fields})
    torch.manual_seed(len(family) + fields.get("num_classes", 0))
    model_ = build_generator(cfg.model)
    with torch.no_grad():
        for p in model_.parameters():
            p.normal_(0, 0.3)
        for name, b in model_.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("mix_count"):  # a fitted mixture prior: unequal weights, spread means
                b.uniform_(1.0, 5.0)
            elif name.endswith("mix_sum"):
                b.normal_(0, 1.0)
            elif name.endswith("mix_scale"):
                b.mul_(2.0)
    save_checkpoint(directory, experiment=cfg, served_state=model_.state_dict(), step=7, epoch=1, ema=False,
                    dataset={})
    if card is not None:
        write_card(directory, card)
    return directory


def _inputs(pipe: GeneratorPipeline, graph: str, n: int) -> dict[str, np.ndarray]:
    if graph == "generate":
        feeds = {"z": seed_latents(list(range(100, 100 + n)), pipe.latent_dim)}
        if pipe.num_classes:
            feeds["labels"] = np.arange(n, dtype=np.int64) % pipe.num_classes
        return feeds
    rng = np.random.default_rng(n)
    return {"images": rng.integers(0, 256, (n, pipe.channels, pipe.image_size, pipe.image_size), dtype=np.uint8)}


def _reference(pipe: GeneratorPipeline, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if graph == "generate":
        labels = feeds.get("labels")
        return pipe.decode(torch.from_numpy(feeds["z"]), None if labels is None else torch.from_numpy(labels)).numpy()
    images = torch.from_numpy(feeds["images"])
    return (pipe.encode(images) if graph == "encode" else pipe.reconstruct(images)).numpy()


def _assert_close(got: np.ndarray, want: np.ndarray, graph: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if graph == "encode":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:  # uint8 images within 1/255
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("name,family,model,graph", CASES, ids=[c[0] for c in CASES])
def test_export_parity_onnx_and_torchscript(tmp_path, name, family, model, graph):
    ckpt = make_checkpoint(tmp_path / "ckpt", family, **model)
    pipe = GeneratorPipeline.from_checkpoint(ckpt)
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.pt"
    export_checkpoint(str(ckpt), "onnx", onnx_path, graph)
    export_checkpoint(str(ckpt), "torchscript", ts_path, graph)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path))
    for n in (1, 5):  # a batch size other than the traced one (2): the batch axis is dynamic
        feeds = _inputs(pipe, graph, n)
        want = _reference(pipe, graph, feeds)
        if graph != "encode":
            assert int(want.max()) - int(want.min()) > 60  # the random model draws real contrast
        _assert_close(session.run(None, feeds)[0], want, graph)
        _assert_close(scripted(*(torch.from_numpy(v) for v in feeds.values())).numpy(), want, graph)


def test_onnx_metadata_carries_version_sizes_and_card(tmp_path):
    card = {"format": "aigc-ray-card/2", "protocol": {"dataset_hash": "abc", "num_samples": 64, "seed": 0},
            "metrics": {"fid": 1.5}}
    ckpt = make_checkpoint(tmp_path / "ckpt", "dcgan", card=card, num_classes=3)
    version = GeneratorPipeline.from_checkpoint(ckpt).version
    for fmt, out in (("onnx", tmp_path / "g.onnx"), ("torchscript", tmp_path / "g.pt")):
        export_checkpoint(str(ckpt), fmt, out)
        meta = read_export_metadata(out)
        assert meta["model_version"] == version and meta["family"] == "dcgan" and meta["graph"] == "generate"
        assert (meta["image_size"], meta["channels"], meta["latent_dim"], meta["num_classes"]) == ("8", "1", "8", "3")
        assert meta["latent_rule"] == "aigc-latents/1"
        assert json.loads(meta["quality_card"]) == card
    import onnx

    model = onnx.load(str(tmp_path / "g.onnx"))
    assert meta.get("opset") is None and read_export_metadata(tmp_path / "g.onnx")["opset"] == str(OPSET)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input]
    assert batch_dims == ["batch", "batch"]


def test_cli_export_and_bad_input(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ae", "ae")
    out = tmp_path / "ae.onnx"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--graph", "reconstruct",
                     "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out

    def fails(*argv: str) -> str:
        assert cli_main(["export", *argv]) == 2
        return capsys.readouterr().err

    err = fails("--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "g.onnx"))
    assert "can't generate" in err and "ae" in err and "--graph reconstruct" in err
    assert not (tmp_path / "g.onnx").exists()
    err = fails("--checkpoint", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "x.onnx"))
    assert "checkpoint:" in err and "missing" in err and "not a directory" in err
    (tmp_path / "empty").mkdir()
    err = fails("--checkpoint", str(tmp_path / "empty"), "--format", "torchscript", "--out", str(tmp_path / "x.pt"))
    assert "not an aigc-ray checkpoint" in err
    gan = make_checkpoint(tmp_path / "gan", "dcgan")
    assert "has no encoder" in fails("--checkpoint", str(gan), "--format", "onnx", "--graph", "encode",
                                     "--out", str(tmp_path / "e.onnx"))
    with pytest.raises(SystemExit):  # argparse refuses an unknown format and names the choices
        cli_main(["export", "--checkpoint", str(gan), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="format: 'tflite' is not supported"):
        export_checkpoint(str(gan), "tflite", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ae.onnx"]  # no partial files left


def test_offline_generator_writes_the_servers_labelled_pngs(tmp_path):
    """examples/offline_generate.py (onnxruntime, numpy, Pillow; no torch) gives the pipeline's images."""
    from PIL import Image

    ckpt = make_checkpoint(tmp_path / "ckpt", "dcgan", num_classes=3)
    pipe = GeneratorPipeline.from_checkpoint(ckpt)
    export_checkpoint(str(ckpt), "onnx", tmp_path / "g.onnx")
    script = REPO / "examples" / "offline_generate.py"
    # -X importtime-free check that torch is never imported: run with torch made unimportable
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch must not be needed offline')\n")
    (blocker / "ray.py").write_text("raise ImportError('ray must not be needed offline')\n")
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "g.onnx"), "--seed", "40", "--num-images", "3",
                          "--labels", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    want = pipe.generate([40, 41, 42], [2])
    for i, seed in enumerate((40, 41, 42)):
        img = Image.open(tmp_path / "out" / f"seed-{seed}.png")
        assert img.text["Model-Version"] == pipe.version and img.text["Seed"] == str(seed)
        assert img.text["AI-Generated"].startswith("true") and img.text["Label"] == "2"
        got = np.asarray(img)
        assert np.abs(got.astype(int) - want[i, 0].numpy().astype(int)).max() <= 1
    # no labels: the pipeline's rule, class seed mod num_classes
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "g.onnx"), "--seed", "7", "--num-images", "2",
                          "--out", str(tmp_path / "nolabels")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = pipe.generate([7, 8])
    for i, seed in enumerate((7, 8)):
        img = Image.open(tmp_path / "nolabels" / f"seed-{seed}.png")
        assert img.text["Label"] == str(seed % 3)
        assert np.abs(np.asarray(img).astype(int) - want[i, 0].numpy().astype(int)).max() <= 1
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "g.onnx"), "--labels", "7",
                          "--out", str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "labels" in bad.stderr and "[0, 2]" in bad.stderr


def test_latent_rule_is_per_seed_and_shared_with_the_offline_tool():
    rows = seed_latents([5, 6, 7], 33)
    assert rows.dtype == np.float32 and rows.shape == (3, 33)
    np.testing.assert_array_equal(seed_latents([6], 33)[0], rows[1])  # independent of batch-mates
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import offline_generate
    finally:
        sys.path.pop(0)
    seeds = [0, 1, 42, 2**62 - 1, 2**64 + 3]
    for dim in (1, 8, 100, 101):
        np.testing.assert_array_equal(offline_generate.seed_latents(seeds, dim), seed_latents(seeds, dim))
    big = seed_latents(list(range(500)), 64)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
