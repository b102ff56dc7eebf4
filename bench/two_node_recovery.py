"""Node loss on a real two-node Ray cluster: a 2-worker training run with one worker on each
node, one node killed mid-run (its whole process group: raylet, agents, the training worker),
the node started again a few seconds later, training resumed from its last checkpoint.

    python bench/two_node_recovery.py [--epochs 4] [--down-s 5] [--out bench/results/two_node_recovery.json]

Both nodes are `ray start` processes on this machine (bench/local_cluster.py: own temp dir,
free ports, token auth). The head has 1 CPU (the driver and Ray Data's read tasks), node_a and
node_b 2 CPUs each and one unit of a custom resource naming them; each training worker asks
for 2 CPUs, so the two workers can only sit one per node, and after node_b dies the run can
only continue once a node with 2 free CPUs joins. Placement is read from Ray's state API
(worker actors -> node ids -> the node's custom resource). Prints and writes JSON:

  kill_to_resume_s      node killed -> the restarted workers load the last checkpoint
  node_back_to_resume_s node_b started again -> resumed (the time Ray needs once capacity returns)
  resumed_from_step     the checkpoint's step; steps_at_kill - resumed_from_step is the work redone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from local_cluster import LocalCluster, _node_ip  # noqa: E402

CHECKPOINT_EVERY = 10


def train_command(args, storage: str) -> list[str]:
    return ["aigc-ray", "train", "--config", "dcgan-digits", "--name", "two-node", "--workers", "2",
            "--epochs", str(args.epochs), "--image-size", "8", "--storage-path", f"{storage}/runs",
            "--data-root", f"{storage}/data", "--set", "model.width=8", "--set", "model.latent_dim=8",
            "--set", "train.batch_size=32", "--set", "train.cpus_per_worker=2", "--set", "train.max_failures=3",
            "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}", "--set", "eval.enabled=false"]


class Driver:
    """The `aigc-ray train` driver process; every output line kept with its arrival time."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_line(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                m = re.search(pattern, line)
                if m and t >= after:
                    return t, m
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.2)
        raise RuntimeError(f"no line matching {pattern!r}; driver output:\n" + self.tail())

    def tail(self, n: int = 60) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def placement(cluster: LocalCluster) -> dict[str, str]:
    """{training worker actor id: node name} from Ray's state API (over the dashboard, with the token)."""
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: next((r for r in ("node_a", "node_b") if r in (n.resources_total or {})), "head")
             for n in list_nodes(address=cluster.address, filters=[("state", "=", "ALIVE")],
                                  raise_on_missing_output=False)}
    actors = list_actors(address=cluster.address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return {a.actor_id[:8]: nodes.get(a.node_id, "?") for a in actors}


def wait_placement(cluster: LocalCluster, want: set[str], timeout: float) -> dict[str, str]:
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            seen = placement(cluster)
        except Exception as err:  # the state API can time out on a loaded machine: ask again
            seen = {"error": str(err)[:200]}
        if set(seen.values()) == want and len(seen) == len(want):
            return seen
        time.sleep(1)
    raise RuntimeError(f"training workers not on {sorted(want)}: {seen}")


def registered_checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def run(args) -> dict:
    started = time.monotonic()
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="aigc-2node-store-"))
    storage = store.as_uri()  # shared storage: both nodes are on this machine, so a local path is shared
    # Ray Train gives a worker group 60 s to start; on a loaded 2-core machine starting two torch
    # workers can take longer, which would only add retries to the numbers measured here
    with LocalCluster(node_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}) as cluster:
        cluster.start_head(num_cpus=1)
        cluster.start_worker("node_a", num_cpus=2, resources='{"node_a": 1}')
        cluster.start_worker("node_b", num_cpus=2, resources='{"node_b": 1}')
        cluster_up_s = time.monotonic() - started
        # the state API client in this process needs token auth like any client
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
        env = cluster.env(RAY_ADDRESS=f"{_node_ip()}:{cluster.gcs_port}")
        driver = Driver(train_command(args, storage), env)
        try:
            before = wait_placement(cluster, {"node_a", "node_b"}, timeout=420)
            run_dir = store / "runs" / "two-node"
            deadline = time.monotonic() + 240
            while len(registered_checkpoints(run_dir)) < 1:  # something to resume from
                if time.monotonic() > deadline or driver.proc.poll() is not None:
                    raise RuntimeError("no checkpoint registered:\n" + driver.tail())
                time.sleep(0.2)
            time.sleep(args.kill_after_s)
            steps_at_kill = max(int((c.get("metrics") or {}).get("step", -1)) for c in registered_checkpoints(run_dir))
            t_kill = time.monotonic()
            cluster.kill_node("node_b")
            time.sleep(args.down_s)
            t_back = time.monotonic()
            cluster.start_worker("node_b", num_cpus=2, resources='{"node_b": 1}')
            node_b_up_s = time.monotonic() - t_back
            t_resume, m = driver.wait_line(r"resuming from \S+ at epoch (\d+), step (\d+)", 420, after=t_kill)
            after = wait_placement(cluster, {"node_a", "node_b"}, timeout=300)
            rc = driver.proc.wait(timeout=600)
            driver.thread.join(timeout=10)
            if rc != 0:
                raise RuntimeError(f"training failed (rc {rc}):\n" + driver.tail())
        finally:
            if driver.proc.poll() is None:
                os.killpg(driver.proc.pid, 9)
        checkpoint = [line for _, line in driver.lines if line.startswith(storage + "/")][-1]
        sys.path.insert(0, str(ROOT))
        from aigc_ray import storage as st
        from aigc_ray.models.checkpoint import load_train_state

        state = load_train_state(st.localize(checkpoint))
    return {
        "kill_to_resume_s": round(t_resume - t_kill, 1),
        "node_back_to_resume_s": round(t_resume - t_back, 1),
        "node_down_s": args.down_s,
        "node_b_restart_s": round(node_b_up_s, 1),
        "resumed_from_epoch": int(m.group(1)), "resumed_from_step": int(m.group(2)),
        "last_checkpoint_step_at_kill": steps_at_kill, "checkpoint_every_steps": CHECKPOINT_EVERY,
        "restarts_in_final_checkpoint": state["resumes"], "final_epoch": state["epoch"], "epochs": args.epochs,
        "placement_before": before, "placement_after": after,
        "cluster_up_s": round(cluster_up_s, 1), "total_s": round(time.monotonic() - started, 1),
        "final_checkpoint": checkpoint,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--down-s", type=float, default=5.0, help="seconds node_b stays dead")
    p.add_argument("--kill-after-s", type=float, default=0.0, help="seconds after the first checkpoint")
    p.add_argument("--out", default=str(HERE / "results" / "two_node_recovery.json"))
    p.add_argument("--store", help="shared-storage directory for data and runs (default: a new temp dir)")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
