"""Text generation through Ray: a tiny gpt trained by Ray Train (shared by the module), its run layout and
quality card, then served next to an image model by Ray Serve: real HTTP on 127.0.0.1."""

import json
import socket
import time

import httpx
import pytest
from waits import wait_until

from aigc_ray.text_config import TextExperimentConfig

MAX_NEW_TOKENS, MAX_PROMPT = 4000, 200


def tiny_text_config(tmp_path, **overrides) -> TextExperimentConfig:
    cfg = TextExperimentConfig.from_dict({
        "data": {"dataset": "stdlib", "data_root": str(tmp_path / "data")},
        "model": {"family": "gpt", "width": 32, "depth": 1, "block_size": 32, "options": {"heads": 2}},
        "train": {"epochs": 2, "steps_per_epoch": 15, "batch_size": 8, "warmup_steps": 5, "cpus_per_worker": 1,
                  "out": str(tmp_path / "runs"), "max_failures": 0, "name": "tiny-gpt"},
        "eval": {"max_blocks": 16, "sample_tokens": 20}})
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture(scope="module")
def text_run(ray_session, tmp_path_factory):
    from aigc_ray.train.text_loop import run_text_training

    tmp = tmp_path_factory.mktemp("text")
    return tmp, run_text_training(tiny_text_config(tmp))


def test_train_writes_the_run_layout_and_a_card_with_interval_and_baselines(text_run):
    from pathlib import Path

    tmp, outcome = text_run
    run = Path(outcome.run_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2] and lines[-1]["step"] == 30
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((Path(outcome.checkpoint) / "card.json").read_text())
    m = card["metrics"]
    assert m["val_bpb_lo"] < m["val_bpb"] < m["val_bpb_hi"] and card["protocol"]["blocks"] == 16
    assert set(card["baselines"]) == {"unigram", "bigram"}
    assert card["baselines"]["bigram"]["val_bpb"] < card["baselines"]["unigram"]["val_bpb"]
    assert (Path(outcome.checkpoint) / "samples.txt").read_text().startswith("def ")
    config = json.loads((Path(outcome.checkpoint) / "config.json").read_text())
    assert config["modality"] == "text" and config["vocab"] == {"kind": "bytes", "size": 256}


def test_rerun_with_the_same_name_resumes(text_run):
    from aigc_ray.train.text_loop import run_text_training

    tmp, first = text_run
    outcome = run_text_training(tiny_text_config(tmp, **{"train.epochs": 3}))
    lines = [json.loads(x) for x in open(f"{outcome.run_dir}/metrics.jsonl").read().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3] and lines[-1]["step"] == 45  # 30 steps were not redone
