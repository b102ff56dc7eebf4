"""Shared fixtures: one local Ray per test session, tiny prepared datasets, tiny checkpoints.

Ray start-up costs seconds on 2 cores, so every test that needs Ray takes ``ray_session``
and shares it. Training fixtures use tiny configs and a few steps.

Every test that starts or uses Ray carries the ``ray`` marker: ``ray_session`` among its fixtures
(directly or through another fixture), or ``@pytest.mark.ray`` on one that starts Ray in a subprocess
(``aigc-ray train``, a cluster of its own). ``pytest -m "not ray"`` runs the rest (~5 min on 2 cores).
The marker is also an xdist group: with pytest-xdist (``-n 2 --dist loadgroup``, not a dependency) all
Ray tests run in one process, one Ray at a time. Measured on this 2-core machine that gained nothing
(CI 36.5 min against 35.4 serially: the Ray tests are CPU-bound and slowed by whatever runs beside them),
so the suite runs in one process.
"""

from __future__ import annotations

import os
import time

import pytest

from aigc_ray.config import ExperimentConfig

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_config(tmp_path, family: str = "dcgan", **overrides) -> ExperimentConfig:
    """A model small enough to train a few steps in seconds on one CPU core."""
    base = {
        "data": {"dataset": "digits", "data_root": str(tmp_path / "data"), "image_size": 8},
        "model": {"family": family, "image_size": 8, "latent_dim": 8, "width": 8},
        "train": {"epochs": 2, "batch_size": 32, "workers": 1, "cpus_per_worker": 1,
                  "out": str(tmp_path / "runs"), "checkpoint_every": 20, "max_failures": 0},
        "eval": {"num_samples": 64},
    }
    if family == "seed-recipe":
        base["model"].pop("width")
    cfg = ExperimentConfig.from_dict(base)
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # logical CPUs beyond the 2 cores: a Tune trial's Ray Data reads need a CPU outside its
        # placement groups, and two trials at a time must never be left waiting for one
        ray.init(num_cpus=5, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root shared by the session, so each dataset is prepared once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tiny_dcgan_run(ray_session, tmp_path_factory, data_root):
    """A tiny dcgan trained for 2 epochs on 8x8 digits, each epoch scored, the best kept: its
    TrainingOutcome (test_eval.py checks the scores and the choice; the rest load its checkpoint)."""
    from aigc_ray.train.loop import run_training

    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(tmp).with_overrides({"data.data_root": str(data_root), "train.name": "tiny-dcgan",
                                           "eval.every_epochs": 1, "train.keep_checkpoints": 1})
    return run_training(cfg)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_dcgan_run):
    """The tiny dcgan's best checkpoint: its local path."""
    return tiny_dcgan_run.checkpoint


@pytest.fixture(scope="session")
def trained_vae_checkpoint(ray_session, tmp_path_factory, data_root):
    from aigc_ray.train.loop import run_training

    tmp = tmp_path_factory.mktemp("ckpt_vae")
    cfg = tiny_config(tmp, "vae").with_overrides({"data.data_root": str(data_root), "train.name": "tiny-vae"})
    return run_training(cfg).checkpoint


def uses_ray(item) -> bool:
    return "ray_session" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray") is not None


@pytest.hookimpl(tryfirst=True)  # before -m selects: `pytest -m "not ray"` runs what needs no Ray
def pytest_collection_modifyitems(config, items):
    for item in items:
        if uses_ray(item):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group("ray"))



def pytest_configure(config):
    if config.getoption("dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError("pytest-xdist 3.8 cannot group tests on pytest >= 9 (it rewrites item._nodeid, which "
                                "pytest 9 ignores), so the tests that use Ray would run in two processes at once: "
                                "install pytest < 9 (pyproject.toml), or run with -n 0")


def pytest_collection_finish(session):
    """In an xdist worker, check the grouping took: xdist names a grouped test NODEID@GROUP."""
    if os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup"):
        stray = [item.nodeid for item in session.items if uses_ray(item) and not item.nodeid.endswith("@ray")]
        if stray:
            raise pytest.UsageError(f"{len(stray)} tests that use Ray are not in the xdist group 'ray' (e.g. {stray[0]}): "
                                    "they would run beside each other on two Ray instances (is pytest >= 9? see pyproject.toml)")

# --- where the suite's time goes: how busy the machine's CPUs were during each slow test ---------
# (A test that is slow with its CPUs idle waits on something, a poll or a timeout; one that is
# slow and busy computes. CI prints both for the 15 slowest tests.)
_CPU_USE: list[tuple[float, float, str]] = []
_BEGAN: dict[str, tuple[float | None, float]] = {}


def _busy_cpu_seconds() -> float | None:
    """Machine-wide CPU seconds spent not idle since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _BEGAN[item.nodeid] = (_busy_cpu_seconds(), time.monotonic())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "teardown" and item.nodeid in _BEGAN:  # carried in the report: an xdist worker's reach the summary
        busy, began = _BEGAN.pop(item.nodeid)
        after, wall = _busy_cpu_seconds(), time.monotonic() - began
        if busy is not None and after is not None:
            share = min(1.0, (after - busy) / max(wall * (os.cpu_count() or 1), 1e-9))
            report.user_properties.append(("cpu_use", (wall, share)))


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "cpu_use" and report.when == "teardown":
            _CPU_USE.append((value[0], value[1], report.nodeid))


def pytest_terminal_summary(terminalreporter):
    if not _CPU_USE:
        return
    wall = sum(w for w, _, _ in _CPU_USE)
    busy = sum(w * share for w, share, _ in _CPU_USE) / max(wall, 1e-9)
    terminalreporter.section(f"CPU use (all {os.cpu_count()} cores, machine-wide, both test processes): {busy:.0%} "
                             f"busy over {wall:.0f} s of tests; the 15 slowest")
    for seconds, share, nodeid in sorted(_CPU_USE, reverse=True)[:15]:
        terminalreporter.write_line(f"{seconds:7.1f}s {share:5.0%} busy  {nodeid}")
