"""`aigc-ray serve --ingress haproxy` (issue 12, speed): HAProxy takes HTTP and gRPC on --host's ports
and hands each request straight to the replica's own server, with no Ray proxy hop. Run as a user runs
it, in a subprocess that starts its own Ray (Serve reads the switch when its controller starts)."""

import base64
import csv
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from aigc_ray.cli import main
from aigc_ray.serving.proto import aigc_pb2, aigc_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from local_cluster import free_ports  # noqa: E402


def test_haproxy_ingress_is_refused_for_a_running_cluster(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # (never reached: refused before Ray starts)
    assert main(["serve", "--checkpoint", "nowhere/ckpt", "--ingress", "haproxy"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_behind_haproxy_answers_http_and_grpc_from_the_replica(trained_checkpoint):
    http_port, grpc_port = free_ports(2)
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")  # its own Ray, beside the session's
    for key in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "aigc_ray.cli", "serve", "--checkpoint", f"gan={trained_checkpoint}",
                             "--ingress", "haproxy", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--max-replicas", "1", "--no-access-log"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ingress: HAProxy"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "no ready line:\n" + "".join(lines[-30:])
        ingress_line = next(line for line in lines if line.startswith("ingress: HAProxy"))
        stats_port = int(ingress_line.split("/stats")[0].rsplit(":", 1)[1])

        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/generate", json={"num_images": 2, "seed": 5}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "gan" and r.json()["seeds"] == [5, 6] and len(r.json()["images"]) == 2
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = aigc_pb2_grpc.GeneratorStub(channel).Generate(aigc_pb2.GenerateRequest(num_images=1, seed=5),
                                                                  timeout=60)
        assert len(reply.images) == 1 and reply.images[0] == base64.b64decode(r.json()["images"][0])
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=30).json()["status"] == "ok"

        # HAProxy's own count: requests reach the replica's servers, not Ray's proxy (its backup).
        # Ray reloads HAProxy (a new process, `-sf`) when the replica set's state changes, and the new
        # process counts from zero, so ask again (one more request each time) until a count shows
        deadline, sessions = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            table = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=30).text.lstrip("# ")
            sessions = {}
            for row in csv.DictReader(io.StringIO(table)):
                role = "replica" if row["svname"].startswith("SERVE_REPLICA") else \
                    "proxy" if row["svname"].startswith("SERVE_PROXY_ACTOR") else None
                if role:
                    sessions[role] = sessions.get(role, 0) + int(row["stot"] or 0)
            if sessions.get("replica", 0) >= 1:
                break
            assert httpx.post(f"http://127.0.0.1:{http_port}/v1/generate", json={"num_images": 1, "seed": 5},
                              timeout=60).status_code == 200
            time.sleep(1)
        assert sessions.get("replica", 0) >= 1 and sessions.get("proxy", 0) == 0, f"{sessions}\n{''.join(lines[-20:])}"
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: Serve and its Ray shut down
        interrupted = time.monotonic()
        try:
            code = proc.wait(timeout=90)
            print(f"stopped {time.monotonic() - interrupted:.1f} s after Ctrl-C")  # (30+ s with Serve's own drain)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, "".join(lines[-30:])
    with pytest.raises(httpx.TransportError):  # nothing left listening
        httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
