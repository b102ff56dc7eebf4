"""A real multi-process Ray cluster on this machine, driven only through the `ray` CLI, for
the end-to-end test and the node-loss benchmark.

Each node is one `ray start --block` process in its own process group (session), so the
node's raylet, GCS, dashboard and workers can be stopped, or killed like a lost machine,
without touching any other Ray on the machine (a test session's local Ray, another
developer's cluster): `ray stop` would stop them all. Every port is picked free, the temp
dir is our own and short (Unix socket paths are limited to ~107 bytes), and token
authentication is on with a token made by `ray get-auth-token --generate`. Nothing here
imports or initialises ray in the calling process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Client-side settings the caller's environment may carry (e.g. a pytest process that runs
# its own local Ray): they must not leak into commands aimed at this cluster.
_SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN_PATH",
          "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_NODE_ID")


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS says are free right now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _listening(port: int) -> bool:
    for host in ("127.0.0.1", _node_ip()):
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            continue
    return False


def _node_ip() -> str:
    """The address Ray picks for this node (the route to the outside, else loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 53))  # as Ray does; no packet is sent, UDP connect only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    agent_port: int
    log: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """``with LocalCluster() as c: c.start_head(num_cpus=4); c.run(["ray", "job", ...])``"""

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aigc-rc-", dir="/tmp")))
    nodes: dict[str, Node] = field(default_factory=dict)
    token: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    node_env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every node's processes (and so for the actors they run)."""

    def __post_init__(self) -> None:
        # `ray get-auth-token --generate` writes ~/.ray/auth_token; a private HOME keeps the
        # caller's own token (and its ~/.ray) untouched.
        home = self.temp_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = self._base_env() | {"HOME": str(home)}
        out = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        self.token = out.stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{32,}", self.token):
            raise RuntimeError(f"unexpected token output: {out.stdout!r} {out.stderr!r}")

    # --- environment -------------------------------------------------------------------

    @staticmethod
    def _base_env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    @property
    def address(self) -> str:
        """The job / Serve REST API (dashboard) address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user of this cluster has: API address, token auth on, the token."""
        return self._base_env() | {"RAY_ADDRESS": self.address, "RAY_DASHBOARD_ADDRESS": self.address,
                                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} | extra

    # --- nodes -------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], timeout: float, wait_ports: list[int]) -> Node:
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        cmd = ["ray", "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir / 'ray'}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}", *args]
        log = self.temp_dir / f"{name}.log"
        # the token goes to the cluster's own processes by environment: RAY_AUTH_MODE=token
        # makes every component require it
        env = self._base_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                                  # Ray code that looks for "the local cluster" (e.g. Train's placement
                                  # group cleaner) would find several on a shared machine; name ours
                                  "RAY_ADDRESS": f"{_node_ip()}:{self.gcs_port}"} | self.node_env
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = Node(name, proc, agent, log)
        self.nodes[name] = node
        deadline = time.monotonic() + timeout
        # the dashboard agent answers last; `ray job submit` needs it on the head
        while not all(_listening(p) for p in [*wait_ports, agent]):
            if not node.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        return node

    def start_head(self, num_cpus: int = 4, resources: str | None = None, timeout: float = 120) -> Node:
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        args = ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
                f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        return self._start("head", args, timeout, [self.gcs_port, self.dashboard_port])

    def start_worker(self, name: str, num_cpus: int, resources: str | None = None, timeout: float = 120) -> Node:
        args = [f"--address={_node_ip()}:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        return self._start(name, args, timeout, [])

    def kill_node(self, name: str) -> None:
        """A lost machine: SIGKILL to the node's whole process group (its raylet, agents and
        workers), no clean shutdown."""
        node = self.nodes.pop(name)
        _signal_group(node.pgid, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop our nodes (workers first): SIGTERM to each group, then SIGKILL what is left."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            node = self.nodes.pop(name)
            _signal_group(node.pgid, signal.SIGTERM)
            # gcs_server takes longer than this to exit on SIGTERM (8 s of every test's teardown went to the wait):
            # the cluster is thrown away with its temp dir, so what is left is killed
            deadline = time.monotonic() + 2
            while _group_alive(node.pgid) and time.monotonic() < deadline:
                time.sleep(0.5)
            _signal_group(node.pgid, signal.SIGKILL)
            if node.proc.poll() is None:
                node.proc.wait(timeout=10)

    def run(self, cmd: list[str] | str, timeout: float, cwd: str | Path | None = None,
            **extra_env: str) -> subprocess.CompletedProcess:
        """A CLI command as a user of this cluster runs it (a shell string runs through bash)."""
        return subprocess.run(cmd, env=self.env(**extra_env), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, shell=isinstance(cmd, str), executable="/bin/bash"
                              if isinstance(cmd, str) else None, stdin=subprocess.DEVNULL)

    def logs_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {n.log.name}\n{n.log.read_text()[-chars:]}" for n in self.nodes.values())

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
