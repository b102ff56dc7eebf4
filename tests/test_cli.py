"""The command line, run as a user runs it: in a subprocess."""

import subprocess
import sys

import pytest


def aigc(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "aigc_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"aigc-ray {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("command", ["prepare", "train", "generate"])
def test_help_explains_each_command(command):
    out = aigc(command, "--help").stdout
    assert "usage: aigc-ray" in out and len(out) > 300


def test_prepare_prints_counts_and_the_output_path(tmp_path):
    out = aigc("prepare", "--dataset", "digits", "--out", str(tmp_path / "d"), "--image-size", "8").stdout
    assert '"train":' in out and out.strip().splitlines()[-1] == str(tmp_path / "d")
    again = aigc("prepare", "--dataset", "digits", "--out", str(tmp_path / "d"), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # a clear error, no traceback
    assert "Traceback" not in again.stderr


def test_bad_config_is_a_clear_error_not_a_traceback():
    proc = aigc("train", "--image-size", "48", "--dry-run", check=False)
    assert proc.returncode != 0 and "48" in proc.stderr and "Traceback" not in proc.stderr
    proc = aigc("train", "--set", "train.nope=1", "--dry-run", check=False)
    assert proc.returncode == 2 and "train.nope" in proc.stderr


def test_train_dry_run_shows_the_one_config(tmp_path):
    out = aigc("train", "--config", "vae-digits", "--epochs", "3", "--set", "model.options.beta=0.5", "--dry-run").stdout
    assert "family: vae" in out and "epochs: 3" in out and "beta: 0.5" in out


def test_generate_is_deterministic_and_needs_no_ray(trained_checkpoint, tmp_path):
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    aigc("generate", "--checkpoint", trained_checkpoint, "--num-images", "16", "--seed", "7", "--out", str(a))
    aigc("generate", "--checkpoint", trained_checkpoint, "--num-images", "16", "--seed", "7", "--out", str(b))
    aigc("generate", "--checkpoint", trained_checkpoint, "--num-images", "16", "--seed", "8", "--out", str(c))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert b"AI-Generated" in a.read_bytes()  # PNG text metadata labels it as generated
    code = ("import sys; from aigc_ray.cli import main; "
            f"main(['generate', '--checkpoint', {trained_checkpoint!r}, '--out', {str(tmp_path / 'd.png')!r}]); "
            "assert 'ray' not in sys.modules, 'generate imported ray'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_generate_rejects_a_non_checkpoint(tmp_path):
    proc = aigc("generate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png"), check=False)
    assert proc.returncode == 2 and "not an aigc-ray checkpoint" in proc.stderr


def test_train_end_to_end_prints_the_checkpoint_last(tmp_path):
    proc = aigc("train", "--image-size", "8", "--set", "model.width=8", "--set", "model.latent_dim=8",
                "--max-steps", "5", "--epochs", "1", "--out", str(tmp_path / "runs"),
                "--data-root", str(tmp_path / "data"), "--set", "eval.enabled=false")
    last = proc.stdout.strip().splitlines()[-1]
    assert "checkpoint_" in last
    assert aigc("generate", "--checkpoint", last, "--out", str(tmp_path / "g.png")).returncode == 0
