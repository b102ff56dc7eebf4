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
    proc = aigc("prepare", "--dataset", "digits", "--out", str(tmp_path / "d"), "--image-size", "8")
    out = proc.stdout
    assert '"train":' in out and out.strip().splitlines()[-1] == str(tmp_path / "d")
    assert "\r" not in proc.stderr and "img/s" not in proc.stderr  # no progress bar in a log: it leaves stale lines
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
    # one process (a Python start with torch costs ~15 s on 2 cores): three generates through the CLI's
    # main, then the check that none of them imported ray
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    runs = [(7, a), (7, b), (8, c)]
    code = ("import sys; from aigc_ray.cli import main\n"
            + "".join(f"assert main(['generate', '--checkpoint', {trained_checkpoint!r}, '--num-images', '16', "
                      f"'--seed', '{seed}', '--out', {str(out)!r}]) in (0, None)\n" for seed, out in runs)
            + "assert 'ray' not in sys.modules, 'generate imported ray'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert b"AI-Generated" in a.read_bytes()  # PNG text metadata labels it as generated
    aigc("generate", "--checkpoint", trained_checkpoint, "--out", str(tmp_path / "d.png"))  # the entry point
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_rejects_a_non_checkpoint(tmp_path):
    proc = aigc("generate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png"), check=False)
    assert proc.returncode == 2 and "not an aigc-ray checkpoint" in proc.stderr


@pytest.mark.slow
@pytest.mark.ray  # `aigc-ray train` starts its own Ray
def test_train_end_to_end_prints_the_checkpoint_last(tmp_path):
    proc = aigc("train", "--image-size", "8", "--set", "model.width=8", "--set", "model.latent_dim=8",
                "--max-steps", "5", "--epochs", "1", "--out", str(tmp_path / "runs"),
                "--data-root", str(tmp_path / "data"), "--set", "eval.enabled=false")
    last = proc.stdout.strip().splitlines()[-1]
    assert "checkpoint_" in last
    # a quiet console by default: our lines, not Ray's (they are there with -v: the test below)
    assert not _ray_lines(proc.stderr), proc.stderr[-3000:]
    assert aigc("generate", "--checkpoint", last, "--out", str(tmp_path / "g.png")).returncode == 0


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    assert aigc("--version").stdout.strip() == f"aigc-ray {version('aigc-ray')}"


def test_every_flag_of_every_command_has_help():
    import argparse

    from aigc_ray.cli import build_parser

    def flags(parser, command):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from flags(sub, name)
            elif action.option_strings:
                yield command, action
    missing = [f"{command} {'/'.join(a.option_strings)}" for command, a in flags(build_parser(), "aigc-ray")
               if not (a.help or "").strip()]
    assert not missing, f"flags without help: {missing}"


@pytest.mark.parametrize("raised, code, message", [
    (RuntimeError("worker group died"), 1, "aigc-ray train: failed: RuntimeError: worker group died"),
    (ValueError("train.epochs must be > 0"), 2, "aigc-ray train: error: train.epochs must be > 0"),
    (KeyboardInterrupt(), 130, "aigc-ray train: interrupted"),
])
def test_exit_codes_say_what_happened(monkeypatch, capsys, raised, code, message):
    """1: the run failed (one line, the traceback only with -v); 2: a bad value; 130: Ctrl-C."""
    from aigc_ray import cli, console
    from aigc_ray.train import loop

    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # main() sets it; put back after the test
    def fail(cfg, address=None):
        raise raised
    monkeypatch.setattr(loop, "run_training", fail)
    assert cli.main(["train", "--epochs", "1"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if code == 1:
        assert cli.main(["train", "--epochs", "1", "-v"]) == 1
        assert "Traceback" in capsys.readouterr().err


def test_usage_errors_exit_2():
    for argv in (["train", "--no-such-flag"], ["generate"], ["nope"], ["generate", "--checkpoint", "x", "--num-images", "0"]):
        proc = aigc(*argv, check=False)
        assert proc.returncode == 2 and "usage: aigc-ray" in proc.stderr, (argv, proc.stderr)


def _ray_lines(stderr: str) -> list[str]:
    """Ray's own start-up lines: its INFO line and its token-auth notice."""
    return [line for line in stderr.splitlines() if "Started a local Ray instance" in line or "Token authentication" in line]


@pytest.mark.ray  # starts a local Ray in a subprocess
def test_a_local_ray_declares_the_machines_cores_and_speaks_with_verbose():
    """The local Ray `aigc-ray train` and `tune` start (init_ray): as many CPUs as the machine has; with -v,
    Ray's own lines (which test_train_end_to_end_prints_the_checkpoint_last finds absent by default)."""
    import os

    code = ("import ray; from aigc_ray import console; from aigc_ray.train.loop import init_ray; "
            "console.set_verbose(True); init_ray(); print(int(ray.cluster_resources()['CPU'])); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == os.cpu_count()
    assert _ray_lines(proc.stderr), proc.stderr[-3000:]
