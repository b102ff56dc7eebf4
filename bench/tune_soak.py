"""Soak: the smoke ASHA sweep back to back, counting hangs (issue 15).

Each sweep is `aigc-ray tune --spec tune/dcgan_asha.yaml --smoke-test` in its own process (its
own local Ray), bounded by --timeout: a sweep still running then is killed and counted as a hang.
ASHA stops trials on purpose: the smoke spec keeps the top half at the epoch-1 rung, and the stop
reaches a pruned trial while it trains its second epoch. ``--ray-data`` makes every trial stream
its data through Ray Data (data.cache_in_memory_mb=0), the path the original hang was on, and
``--decoy`` runs a second, idle Ray instance beside each sweep: the condition under which Train's
own placement-group cleaner cannot work (see aigc_ray/tuning/watch.py).

Each sweep takes the machine's Ray lock (--lock) for its own duration only, so other Ray users
get their turn between sweeps. One JSON line per sweep is appended to
bench/results/tune_soak.jsonl as it ends; the summary is printed at the end.

    python bench/tune_soak.py --sweeps 30 --ray-data --decoy
    python bench/tune_soak.py --sweeps 2 --timeout 300         # a short run

tests/test_tune_waits.py runs one sweep of it on the test session's cluster (--address).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DECOY = "import ray, time; ray.init(num_cpus=1, include_dashboard=False); print('decoy up', flush=True); time.sleep(3600)"


def soak_spec(path: Path, ray_data: bool) -> Path:
    """tune/dcgan_asha.yaml, with the smoke variant streaming through Ray Data when asked."""
    raw = yaml.safe_load((ROOT / "tune" / "dcgan_asha.yaml").read_text())
    if ray_data:
        raw["smoke"]["overrides"]["data.cache_in_memory_mb"] = 0
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def machine_lock(lock: str | None):
    if not lock:
        yield 0.0
        return
    began = time.monotonic()
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - began
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def one_sweep(index: int, spec: Path, out: Path, timeout: float, decoy: bool, env: dict,
              extra: tuple[str, ...] = ()) -> dict:
    """Run one smoke sweep (and its decoy), bounded by ``timeout``; what happened, as a dict."""
    decoy_proc = None
    if decoy:  # its own process group, so it goes with everything it started
        decoy_proc = subprocess.Popen([sys.executable, "-c", DECOY], env=env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        decoy_proc.stdout.readline()  # "decoy up"
    log = out / f"sweep_{index:03d}.log"
    began = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "aigc_ray.cli", "tune", "--spec", str(spec), "--smoke-test",
                                 "--out", str(out / f"sweep_{index:03d}"), *extra], env=env, cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, hung = None, True
    seconds = time.monotonic() - began
    if decoy_proc is not None:
        _kill_group(decoy_proc)
    text = log.read_text(errors="replace")
    summary = out / f"sweep_{index:03d}" / "summary.json"
    trials = json.loads(summary.read_text())["trials"] if summary.is_file() else []
    return {"sweep": index, "seconds": round(seconds, 1), "rc": rc, "hung": hung, "trials": len(trials),
            "stopped_early": sum(t["stopped_early"] for t in trials),
            "failed": sum(t["status"] == "ERROR" for t in trials),
            "released_by_sweep": text.count("released its workers' placement group"),
            "cleaned_by_train": text.count("Cleaning up placement group"),
            "status_lines": text.count("sweep dcgan-asha-smoke at"),
            "log": str(log) if hung or rc else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds before a sweep counts as hung")
    parser.add_argument("--ray-data", action="store_true", help="stream every trial's data through Ray Data")
    parser.add_argument("--decoy", action="store_true", help="a second, idle Ray instance beside each sweep")
    parser.add_argument("--lock", default="/tmp/aigc-ray-ray.lock", help="taken per sweep; '' for none")
    parser.add_argument("--budget", type=float, default=0.0, help="start no sweep after this many seconds (0: none)")
    parser.add_argument("--num-samples", type=int, default=0, help="trials per sweep (default: the smoke spec's 4)")
    parser.add_argument("--address", default=None, help="run the sweeps on this Ray cluster instead of a local Ray each")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "tune_soak.jsonl"))
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="tune-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = soak_spec(out / "soak.yaml", args.ray_data)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", RAY_TRAIN_V2_ENABLED="1")
    env.pop("RAY_ADDRESS", None)  # every sweep starts its own local Ray, as a user's would
    if args.address:
        env["RAY_ADDRESS"] = args.address
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    began, records = time.monotonic(), []
    for index in range(args.sweeps):
        if args.budget and time.monotonic() - began > args.budget:
            print(f"budget of {args.budget:.0f}s spent: stopping after {index} sweep(s)", flush=True)
            break
        with machine_lock(args.lock) as waited:
            record = one_sweep(index, spec, out, args.timeout, args.decoy, env,
                               ("--num-samples", str(args.num_samples)) if args.num_samples else ())
        record |= {"lock_wait_s": round(waited, 1), "ray_data": args.ray_data, "decoy": args.decoy,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        records.append(record)
        with open(results_path, "a") as sink:
            sink.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    hangs = sum(r["hung"] for r in records)
    errors = sum(1 for r in records if not r["hung"] and r["rc"] != 0)
    seconds = [r["seconds"] for r in records]
    print(f"\n{len(records)} sweep(s), {hangs} hang(s), {errors} failed run(s); "
          f"trials stopped early by ASHA: {sum(r['stopped_early'] for r in records)}; "
          f"placement groups released by the sweep: {sum(r['released_by_sweep'] for r in records)}; "
          + (f"seconds per sweep: min {min(seconds):.0f}, median {sorted(seconds)[len(seconds) // 2]:.0f}, "
             f"max {max(seconds):.0f}" if seconds else ""), flush=True)
    return 1 if hangs or errors else 0


if __name__ == "__main__":
    sys.exit(main())
