"""Text generation without Ray: the byte-level models, their caches, decoding, text data preparation,
the n-gram baselines and the text config. (test_text_serving.py trains and serves through Ray.)"""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aigc_ray.cli import main
from aigc_ray.config import ConfigError, load_config
from aigc_ray.data.text import TextDataError, load_tokens, prepare_text, read_text_manifest
from aigc_ray.models.text_registry import build_text_model
from aigc_ray.text_config import TextExperimentConfig
from aigc_ray.text_pipeline import SamplingSettings, TextPipeline
from aigc_ray.text_quality import NGram, baselines, interval


def tiny(family="gpt", **options) -> TextExperimentConfig:
    return TextExperimentConfig.from_dict({"model": {"family": family, "width": 32, "depth": 2, "block_size": 16,
                                                     "options": options}})


def test_text_models_import_torch_only():
    code = "import sys, aigc_ray.models.gpt, aigc_ray.models.rnn_lm, aigc_ray.text_pipeline; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family,options", [("gpt", {}), ("gpt", {"positions": "rotary"}), ("rnn-lm", {}),
                                            ("rnn-lm", {"cell": "lstm"})])
def test_decoding_with_the_cache_gives_the_full_forward_logits(family, options):
    torch.manual_seed(0)
    model = build_text_model(tiny(family, **options).model).eval()
    x = torch.randint(0, 256, (2, 12))
    full, _ = model(x)
    logits, state = model(x[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12):  # one new position per call
        logits, state = model(x[:, t:t + 1], state, use_cache=True)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_gpt_head_is_tied_to_the_embedding():
    model = build_text_model(tiny().model)
    assert not any("head" in k for k in model.state_dict())  # logits = h @ E^T: one matrix, stored once


def _pipe(family="gpt") -> TextPipeline:
    torch.manual_seed(0)
    cfg = tiny(family)
    return TextPipeline(build_text_model(cfg.model), {"model": cfg.to_dict()["model"], "vocab": {"kind": "bytes"}}, "v")


def test_same_seed_same_text_and_decoding_past_the_block_size():
    pipe = _pipe()
    s = SamplingSettings(max_new_tokens=40, temperature=1.0, seed=7)  # 40 > block_size 16: the cache is rebuilt
    progress = {}
    a = pipe.complete("héllo ", s)
    b = "".join(pipe.stream("héllo ", s, progress))
    assert a == b and progress == {"tokens": 40, "finish_reason": "length"}
    assert pipe.complete("héllo ", SamplingSettings(max_new_tokens=40, seed=8)) != a
    greedy = SamplingSettings(max_new_tokens=10, temperature=0.0, top_k=5, top_p=0.5)
    assert pipe.complete("x", greedy) == pipe.complete("x", greedy)


def test_a_stop_string_ends_the_text_before_it():
    pipe = _pipe("rnn-lm")
    free = pipe.complete("ab", SamplingSettings(max_new_tokens=30, seed=3, temperature=0.0))
    stop = free[5:7]
    progress = {}
    cut = "".join(pipe.stream("ab", SamplingSettings(max_new_tokens=30, seed=3, temperature=0.0, stop=[stop]), progress))
    assert cut == free[:free.index(stop)] and progress["finish_reason"] == "stop"


def test_prepare_counts_what_it_leaves_out_and_splits_deterministically(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    good = ("def f(x):\n    return x + 1\n" * 400).encode()
    (src / "a.py").write_bytes(good)
    (src / "sub" / "copy.py").write_bytes(good)  # an exact duplicate
    (src / "b.txt").write_text("héllo wörld, " * 500, encoding="utf-8")
    (src / "empty.txt").write_bytes(b"  \n")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 10)  # not UTF-8
    (src / "big.txt").write_bytes(b"x" * 5000)
    m = prepare_text(f"text:{src}", tmp_path / "out", max_file_bytes=4096 * 4, validation_every=3)
    assert m["dropped"] == {"duplicate": 1, "empty": 1, "not_utf8": 1} and m["documents"] == 3
    m2 = prepare_text(f"text:{src}", tmp_path / "out2", max_file_bytes=6000, validation_every=2)
    assert m2["skipped"] == {"file_too_large": 3}  # judged from the size: a.py, copy.py (11.2 KB), b.txt (7.5 KB)
    again = prepare_text(f"text:{src}", tmp_path / "out3", max_file_bytes=4096 * 4, validation_every=3)
    assert again["content_hash"] == m["content_hash"]
    train, val = load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "validation")
    assert len(train) + len(val) == len(good) + len("héllo wörld, ".encode() * 500) + 5000 + 2 * 2 and len(val) > 0
    assert read_text_manifest(tmp_path / "out")["counts"] == {"train": len(train), "validation": len(val)}


def test_an_empty_corpus_is_an_error_naming_the_dataset(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.txt").write_bytes(b"")
    (tmp_path / "e" / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TextDataError, match=r"data.dataset=.*empty after cleaning.*not_utf8"):
        prepare_text(f"text:{tmp_path / 'e'}", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing that looks complete


def test_parquet_text_column_and_a_wrong_type_refused(tmp_path):
    rows = ["print('hi')\n" * 800, "x = 1\n" * 900, "print('hi')\n" * 800, ""]
    pq.write_table(pa.table({"text": rows}), tmp_path / "t.parquet")
    m = prepare_text(f"parquet:{tmp_path / 't.parquet'}", tmp_path / "out", validation_every=2)
    assert m["documents"] == 2 and m["dropped"] == {"duplicate": 1, "empty": 1}
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(TextDataError, match="column 'text' is int64"):
        prepare_text(f"parquet:{tmp_path / 'n.parquet'}", tmp_path / "out2")


def test_baselines_bigram_beats_unigram_and_random_bytes_cost_8_bits():
    rng = np.random.default_rng(0)
    text = np.frombuffer(("the cat sat on the mat. " * 2000).encode(), dtype=np.uint8)
    b = baselines(text[:40000], text[40000:], block_size=32)
    assert b["bigram"]["mean"] < b["unigram"]["mean"] and b["unigram"]["lo"] <= b["unigram"]["mean"] <= b["unigram"]["hi"]
    noise = rng.integers(0, 256, 200_000).astype(np.uint8)
    bits = NGram(noise[:100_000], 2).bits(noise[100_000:], np.arange(1, 5000))
    assert abs(bits.mean() - 8.0) < 0.3  # nothing to learn: about log2(256)
    assert interval(np.array([1.0, 1.0, 1.0]))["hi"] == 1.0


def test_text_config_errors_name_the_field(capsys):
    with pytest.raises(ConfigError, match="model.width=30 is not a multiple of model.options.heads=4"):
        TextExperimentConfig.from_dict({"model": {"width": 30}})
    with pytest.raises(ConfigError, match=r"model.options.cell means nothing for text model family 'gpt'"):
        TextExperimentConfig.from_dict({"model": {"options": {"cell": "gru"}}})
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("gpt-stdlib").with_overrides({"train.lr": 3})
    assert main(["train", "--config", "gpt-stdlib", "--image-size", "16", "--dry-run"]) == 2
    assert "unknown config key 'data.image_size' for a text config" in capsys.readouterr().err
    assert main(["train", "--config", "gru-stdlib", "--dry-run"]) == 0
    assert "modality: text" in capsys.readouterr().out


def test_tampered_text_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    from aigc_ray.models.checkpoint import CheckpointError
    from aigc_ray.models.text_checkpoint import load_text_model, save_text_checkpoint

    cfg = tiny()
    model = build_text_model(cfg.model)
    save_text_checkpoint(tmp_path, experiment=cfg, state=model.state_dict(), step=1, epoch=1, dataset={})
    load_text_model(tmp_path)
    state = model.state_dict()
    state["tok.weight"] = torch.zeros(10, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_text_model(tmp_path)


def test_the_shipped_text_sweep_spec_loads_and_bad_specs_name_the_key(tmp_path, capsys):
    from aigc_ray.tuning.text_sweep import is_text_spec, load_text_spec

    spec = load_text_spec("tune/gpt_asha.yaml")
    assert is_text_spec("tune/gpt_asha.yaml") and spec.metric == "val_bpb" and spec.mode == "min"
    assert set(spec.space) == {"train.lr", "model.width", "model.depth", "model.dropout"}
    smoke = load_text_spec("tune/gpt_asha.yaml", smoke=True)
    assert smoke.epochs == 2 and smoke.base_config().model.block_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: text\nname: x\nbase: gpt-stdlib\nspace: {model.width: {choice: [30]}}\n")
    with pytest.raises(ConfigError, match=r"space.model.width=30: .*not a multiple of model.options.heads"):
        load_text_spec(str(bad))
    bad.write_text("modality: text\nname: x\nbase: gpt-stdlib\nspace: {train.epochs: {choice: [3]}}\n")
    with pytest.raises(ConfigError, match="space.train.epochs is set by the sweep itself"):
        load_text_spec(str(bad))
    assert main(["tune", "--spec", "tune/gpt_asha.yaml", "--smoke-test", "--dry-run"]) == 0
    assert "name: gpt-asha" in capsys.readouterr().out
