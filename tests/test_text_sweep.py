"""Text sweeps: the shipped spec's smoke variant run for real through `aigc-ray tune` on the session Ray, its
exported best loaded and completed as the server does; the flags' wiring and refusals without Ray."""

import dataclasses
import io
import json
import re
import sys
from pathlib import Path

import pytest

from aigc_ray.cli import main
from aigc_ray.tuning.text_sweep import load_text_spec

SPEC = str(Path(__file__).resolve().parents[1] / "tune" / "gpt_asha.yaml")


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, tmp_path_factory):
    """`aigc-ray tune --spec tune/gpt_asha.yaml --smoke-test --out OUT`, in process: (OUT, exit code, stdout)."""
    out = tmp_path_factory.mktemp("text-sweep") / "tune"
    capture, printed = pytest.MonkeyPatch(), io.StringIO()
    capture.setattr(sys, "stdout", printed)
    try:
        code = main(["tune", "--spec", SPEC, "--smoke-test", "--out", str(out)])
    finally:
        capture.undo()
    return out, code, printed.getvalue()


def test_the_smoke_sweep_lists_its_trials_and_exports_a_best_that_serves_as_is(smoke_sweep):
    from aigc_ray.text_pipeline import SamplingSettings, TextPipeline

    out, code, printed = smoke_sweep
    assert code == 0, printed
    spec = load_text_spec(SPEC, smoke=True)
    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == spec.num_samples and all(t["error"] is None for t in trials)
    assert all(isinstance(t["val_bpb"], float) and 1 <= t["epochs"] <= spec.epochs for t in trials)
    assert summary["best"]["val_bpb"] == min(t["val_bpb"] for t in trials)
    best = Path(re.search(r"best checkpoint: (\S+)", printed).group(1))
    assert best == out / "best" and best.is_dir()

    card = json.loads((best / "card.json").read_text())["metrics"]  # the card of the checkpoint the summary ranks
    assert card["val_bpb_lo"] < card["val_bpb"] < card["val_bpb_hi"] and card["val_bpb"] == summary["best"]["val_bpb"]
    pipe = TextPipeline.from_checkpoint(best)  # what a Serve replica loads (serving/model.py)
    settings = SamplingSettings(max_new_tokens=24, temperature=1.0, seed=5)
    text = pipe.complete("def ", settings)
    assert text and pipe.complete("def ", settings) == text
    assert pipe.complete("def ", SamplingSettings(max_new_tokens=24, temperature=1.0, seed=6)) != text


def test_the_exported_best_goes_through_the_text_promote_gate(smoke_sweep, capsys):
    """Its card pairs with a served text card block by block: against itself the gate refuses (no gain)."""
    out, _, _ = smoke_sweep
    best = str(out / "best")
    assert main(["promote", "--model", "text", "--checkpoint", best, "--served", best, "--gate-only"]) == 1
    assert "REFUSED" in capsys.readouterr().out


def test_resume_keeps_the_finished_trials_and_exports_the_same_best(smoke_sweep, capsys):
    out, _, _ = smoke_sweep
    before = json.loads((out / "summary.json").read_text())
    reports = {p.name: p.read_text() for p in (out / "gpt-asha" / "history").iterdir()}  # every report of each trial
    assert len(reports) == len(before["trials"])
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--out", str(out), "--resume"]) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after["trials"] == before["trials"] and after["best"] == before["best"] and not after["interrupted"]
    assert {p.name: p.read_text() for p in (out / "gpt-asha" / "history").iterdir()} == reports  # nothing retrained
    assert f"best checkpoint: {out / 'best'}" in capsys.readouterr().out


# ---- the flags without Ray -------------------------------------------------------------------------------

def _fake_sweep(monkeypatch, exported):
    """run_text_sweep replaced by its outcome; returns the keyword arguments it was called with."""
    from aigc_ray.tuning import text_sweep

    calls = {}
    best = {"trial": "t1", "val_bpb": 2.5}

    def run(spec, **kwargs):
        calls.update(kwargs)
        return {"trials": [{"trial": "t1", "config": {}, "epochs": 2, "val_bpb": 2.5, "best_epoch": 2, "error": None}],
                "interrupted": False, "best": best if exported else None, "exported": exported}

    monkeypatch.setattr(text_sweep, "run_text_sweep", run)
    return calls


def test_promote_hands_the_exported_best_to_the_promote_gate(monkeypatch, capsys):
    from aigc_ray.serving import promote

    requests = []
    monkeypatch.setattr(promote, "promote", lambda req: requests.append(req) or 1)  # 1: the gate refused
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _fake_sweep(monkeypatch, "/runs/tune/best")
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--promote", "text"]) == 2
    assert "--promote: the sweep must run on the Ray cluster" in capsys.readouterr().err
    calls = _fake_sweep(monkeypatch, "/runs/tune/best")
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--address", "auto", "--promote", "text"]) == 1
    (req,) = requests
    assert (req.model, req.candidate, req.address) == ("text", "/runs/tune/best", "auto") and calls["address"] == "auto"
    assert req.data_root == load_text_spec(SPEC, smoke=True).base_config().data.data_root
    _fake_sweep(monkeypatch, None)  # no trial scored: nothing to promote
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--address", "auto", "--promote", "text"]) == 1
    assert len(requests) == 1


def test_storage_path_and_resume_reach_the_sweep(monkeypatch):
    calls = _fake_sweep(monkeypatch, "/runs/tune/best")
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--storage-path", "s3://bucket/sweeps", "--resume"]) == 0
    assert calls["storage_path"] == "s3://bucket/sweeps" and calls["resume"] is True


def test_resume_and_a_second_start_are_refused_naming_the_flag(tmp_path, capsys):
    from aigc_ray import storage
    from aigc_ray.tuning.text_sweep import SPEC_FILE

    out = tmp_path / "tune"
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--out", str(out), "--resume"]) == 2
    assert f"--resume: no text sweep to resume at {out / 'gpt-asha'}" in capsys.readouterr().err
    experiment = out / "gpt-asha"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"")  # a sweep was started here
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    started = dataclasses.asdict(load_text_spec(SPEC, smoke=True)) | {"epochs": 7}  # started with other epochs
    storage.write_json(str(experiment / SPEC_FILE), started)
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--out", str(out), "--resume"]) == 2
    assert "was started from another spec (differs in: epochs)" in capsys.readouterr().err
    assert main(["tune", "--spec", SPEC, "--smoke-test", "--out", "s3://bucket/out"]) == 2
    assert "--out s3://bucket/out: a local directory" in capsys.readouterr().err


def test_a_bad_scheduler_key_is_named(tmp_path):
    from aigc_ray.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: text\nname: x\nbase: gpt-stdlib\nspace: {train.lr: {choice: [0.001]}}\n"
                   "scheduler: {grace_period: 1, reduction_factr: 2}\n")
    with pytest.raises(ConfigError, match="scheduler: ASHA's keys are"):
        load_text_spec(str(bad))
    bad.write_text("modality: text\nname: x\nbase: gpt-stdlib\nspace: {train.lr: {choice: [0.001]}}\n"
                   "scheduler: {grace_period: 0}\n")
    with pytest.raises(ConfigError, match="scheduler.grace_period=0: an integer >= 1"):
        load_text_spec(str(bad))
