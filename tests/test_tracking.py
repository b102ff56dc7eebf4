"""Experiment tracking (issue 28): a training run's TensorBoard event files, read back here with nothing but
tensorboardX's own protobufs, hold what metrics.jsonl and samples/ hold; the epoch line has an ETA. Rides on the
session's `trained_checkpoint` run (no training of its own); MLflow is checked only where it is installed."""

import json
import struct
from pathlib import Path

import pytest
from tensorboardX.proto.event_pb2 import Event

from aigc_ray.train.tracking import numbers


def _events(run_dir: Path) -> list[tuple[str, Event]]:
    """(file name, event) of every record of every event file in run_dir (TFRecord framing, CRCs not checked)."""
    out = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            out.append((path.name, Event.FromString(data[i + 12:i + 12 + length])))
            i += 12 + length + 4
    return out


def _values(events) -> dict[str, dict[int, object]]:
    by_tag: dict[str, dict[int, object]] = {}
    for _, event in events:
        for value in event.summary.value:
            by_tag.setdefault(value.tag, {})[event.step] = value
    return by_tag


def test_training_writes_tensorboard_beside_metrics_jsonl(trained_checkpoint):
    run_dir = Path(trained_checkpoint).parent
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(run_dir)
    tags = _values(events)
    # rank 0's file (per epoch) and the validation task's (per evaluation): one of each role, nothing else
    roles = sorted({name.split(".")[-3] for name, _ in events})
    assert roles == ["eval", "train"], sorted({name for name, _ in events})

    evals = {row["epoch"]: json.loads((run_dir / "evals" / f"epoch_{row['epoch']:05d}.json").read_text())
             for row in history if "fid" in row}
    assert evals, history
    for row in history:  # every number of every epoch at its epoch: training's, then the evaluation's
        scored = numbers(evals.get(row["epoch"], {}))
        for key, value in numbers(row).items():
            if key not in scored:
                assert tags[f"train/{key}"][row["epoch"]].simple_value == pytest.approx(value, rel=1e-5), key
        for key, value in scored.items():  # whatever the evaluation returned: floor, ratio, interval included
            assert tags[f"eval/{key}"][row["epoch"]].simple_value == pytest.approx(value, rel=1e-5), key
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s"):
        assert set(tags[f"train/{key}"]) == {1, 2}, key
    assert "eval/fid" in tags and "eval/fid_floor" in tags

    grid = tags["samples"][2].image  # the last epoch's grid, the same picture as samples/epoch_002.png
    png = (run_dir / "samples" / "epoch_002.png").read_bytes()
    assert (grid.width, grid.height) == struct.unpack(">II", png[16:24])
    config = tags["config/text_summary"][0].tensor.string_val[0].decode()
    assert "family: dcgan" in config and "name: tiny-dcgan" in config


def test_epoch_line_says_how_long_the_rest_takes():
    from aigc_ray.train.loop import _epoch_line

    m = {"epoch": 3, "step": 30, "loss_d": 1.0, "images_per_s": 100.0, "epoch_time_s": 2.5}
    assert _epoch_line(m, 10, 125.0).endswith("100 img/s 2.5s eta 2m05s")
    assert _epoch_line(m, 3, 0.0).endswith("100 img/s 2.5s")  # the last epoch: nothing left
