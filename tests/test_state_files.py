"""State files (metrics.jsonl, evals/*.json, asha_rungs.json, card.json, summaries) are replaced
whole or not at all, and readers survive a torn file: a warning, never a crash loop."""

import json
import os
import subprocess
import sys

from aigc_ray import storage
from aigc_ray.models.checkpoint import read_card, write_card
from aigc_ray.train.validation import EVALS, merge_evals, read_history

FULL_DISK = r"""
import resource, signal, sys
from aigc_ray import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # "the disk fills up" after 4 KiB
try:
    storage.write_bytes(sys.argv[1], b'{"epoch": 2}\n' * 1000)
except OSError as err:
    print("failed:", err.errno)
"""


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    storage.write_bytes(str(path), b'{"epoch": 1}\n')
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert "failed: 27" in proc.stdout, proc.stderr[-2000:]  # EFBIG
    assert path.read_bytes() == b'{"epoch": 1}\n'
    assert os.listdir(path.parent) == ["metrics.jsonl"]  # no temp file left behind


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss_g": 0.5}\n{"epoch": 2, "loss_g": 0.4}\n{"epoch": 3, "lo')
    assert read_history(str(run)) == [{"epoch": 1, "loss_g": 0.5}, {"epoch": 2, "loss_g": 0.4}]
    assert "metrics.jsonl: its last line is torn" in capsys.readouterr().err


def test_a_torn_evaluation_record_is_skipped(tmp_path, capsys):
    run = tmp_path / "run"
    storage.write_json(str(run / EVALS / "epoch_00001.json"), {"epoch": 1, "step": 5, "fid": 3.0})
    (run / EVALS / "epoch_00002.json").write_text('{"epoch": 2, "fi')
    history = merge_evals(str(run), [{"epoch": 1}, {"epoch": 2}])
    assert history == [{"epoch": 1, "fid": 3.0}, {"epoch": 2}]
    assert "epoch_00002.json is torn" in capsys.readouterr().err


def test_a_bad_card_reads_as_no_card(tmp_path, capsys):
    write_card(tmp_path, {"format": "aigc-ray-card/2", "metrics": {"fid": 1.0}})
    assert read_card(tmp_path) == {"format": "aigc-ray-card/2", "metrics": {"fid": 1.0}}
    (tmp_path / "card.json").write_text('{"metrics": {"fi')
    assert read_card(tmp_path) is None
    (tmp_path / "card.json").write_text("[1, 2]")
    assert read_card(tmp_path) is None
    assert capsys.readouterr().err.count("warning:") == 2


def test_torn_asha_rungs_start_empty_with_a_warning(tmp_path, capsys):
    from aigc_ray.tuning.asha import ResumableASHA

    path = tmp_path / "asha_rungs.json"
    path.write_text('{"rungs": [[{"t1": 0.')
    scheduler = ResumableASHA(str(path), metric="fid", mode="min", max_t=4, grace_period=1)
    scheduler._load()
    assert "not valid JSON" in capsys.readouterr().err
    scheduler._save()
    assert set(json.loads(path.read_text())) == {"rungs", "trial_brackets", "num_stopped"}
