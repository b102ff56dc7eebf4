"""README "On a cluster", end to end on a real Ray cluster: `ray start --head` with token auth,
`ray job submit` of a training run with the README's command, then `serve deploy` of
serve/config.yaml pointed at the job's checkpoint, one HTTP and one gRPC call, cluster stopped.

The cluster is separate from the test session's local Ray (`ray_session`): its own temp dir,
free ports, its own process group, and every step is a CLI subprocess; this process never
connects its ray module to it.
"""

from __future__ import annotations

import base64
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from local_cluster import LocalCluster, free_ports  # noqa: E402

pytestmark = pytest.mark.ray  # its own Ray cluster (`ray start`), never beside another test's Ray

SECTION = (ROOT / "README.md").read_text().split("## On a cluster", 1)[1].split("\n## ", 1)[0]
# what makes the README's full-size run a test-sized one: appended flags override earlier ones
TINY = ("--image-size 8 --epochs 1 --set model.width=8 --set model.latent_dim=8 --set train.batch_size=64 "
        "--set train.cpus_per_worker=1 --set eval.enabled=false")


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", SECTION, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


def readme_command(prefix: str, contains: str = "") -> str:
    found = [c for c in readme_commands() if c.startswith(prefix) and contains in c]
    assert len(found) == 1, f"README 'On a cluster' should have one `{prefix} ...{contains}` command: {found}"
    return found[0]


def test_readme_cluster_commands_are_consistent():
    """The client environment the README sets is what the e2e test gives its commands, and the
    `aigc-ray ...` part of every `ray job submit` line parses with the real CLI."""
    from aigc_ray.cli import build_parser

    exports = readme_command("export RAY_ADDRESS=")
    assert set(shlex.split(exports)[1:]) == {"RAY_ADDRESS=http://127.0.0.1:8265",
                                             "RAY_DASHBOARD_ADDRESS=http://127.0.0.1:8265", "RAY_AUTH_MODE=token"}
    submits = [c for c in readme_commands() if c.startswith("ray job submit")]
    assert submits
    for cmd in submits:
        assert " --working-dir . --runtime-env deploy/job-runtime-env.yaml -- aigc-ray " in cmd
        args = shlex.split(cmd.split(" -- ", 1)[1].replace('"$STORAGE', '"s3://b'))[1:]
        build_parser().parse_args(args)
    assert "ray get-auth-token --generate" in readme_commands()
    assert "serve deploy serve/config.yaml" in readme_commands()


def _job_id(output: str) -> str:
    match = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert match, output[-3000:]
    return match.group(1)


@pytest.fixture
def cluster():
    with LocalCluster() as c:
        c.start_head(num_cpus=3)
        yield c


@pytest.mark.slow
def test_job_submit_then_serve_deploy_on_a_token_auth_cluster(cluster, tmp_path):
    storage = (tmp_path / "shared").as_uri()  # a shared-storage URI, as $STORAGE is on a real cluster

    # token auth is on: the job API refuses a client without the token
    denied = cluster.run(["ray", "job", "list"], timeout=60, RAY_AUTH_TOKEN="0" * 64)
    assert denied.returncode != 0, denied.stdout

    train = readme_command("ray job submit", "aigc-ray train") + " " + TINY
    started = time.monotonic()
    job = cluster.run(train, timeout=360, cwd=ROOT, STORAGE=storage)
    job_s = time.monotonic() - started
    assert job.returncode == 0, f"{job.stdout[-4000:]}\n{job.stderr[-4000:]}\n{cluster.logs_tail()}"
    job_id = _job_id(job.stdout + job.stderr)
    logs = cluster.run(["ray", "job", "logs", job_id], timeout=60)
    assert logs.returncode == 0, logs.stderr
    checkpoint = logs.stdout.strip().splitlines()[-1]
    # the checkpoint is on the shared storage, not in the job's temporary working directory
    assert checkpoint.startswith(storage + "/runs/sngan-digits-")  # the default config trains sngan, logs.stdout[-2000:]
    ckpt_dir = Path(checkpoint.removeprefix("file://"))
    assert (ckpt_dir / "model.safetensors").is_file() and (ckpt_dir / "config.json").is_file()
    assert (ckpt_dir.parent / "metrics.jsonl").is_file()
    assert list((tmp_path / "shared" / "data" / "prepared").iterdir())
    print(f"job submit -> checkpoint: {job_s:.1f}s")

    _serve_and_call(cluster, tmp_path, ROOT / "serve" / "config.yaml", checkpoint)


def _serve_and_call(cluster: LocalCluster, tmp_path: Path, serve_config: Path, checkpoint: str) -> None:
    import grpc
    import httpx

    config = yaml.safe_load(serve_config.read_text())
    http_port, grpc_port = free_ports(2)
    config.setdefault("http_options", {}).update(host="127.0.0.1", port=http_port)
    config.setdefault("grpc_options", {})["port"] = grpc_port
    app = config["applications"][0]
    app["args"]["checkpoints"] = [checkpoint]
    copy = tmp_path / "config.yaml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))

    deploy = readme_command("serve deploy").replace("serve/config.yaml", str(copy))
    out = cluster.run(deploy, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    deadline = time.monotonic() + 150
    checked = time.monotonic()
    while True:  # serve deploy returns at once; the application comes up in the background
        try:
            r = httpx.post(f"http://127.0.0.1:{http_port}/v1/generate", json={"num_images": 2, "seed": 7},
                           timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        late = time.monotonic() > deadline
        if late or time.monotonic() - checked > 10:  # `serve status` is a CLI start (~2 s of CPU): not every poll
            checked = time.monotonic()
            status = cluster.run(["serve", "status"], timeout=60)
            assert "DEPLOY_FAILED" not in status.stdout, status.stdout
            assert not late, f"Serve never answered:\n{status.stdout}\n{cluster.logs_tail()}"
        time.sleep(1)
    body = r.json()
    assert len(body["images"]) == 2 and body["seeds"] == [7, 8]

    from aigc_ray.serving.proto import aigc_pb2, aigc_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = aigc_pb2_grpc.GeneratorStub(channel)
        reply = stub.Generate(aigc_pb2.GenerateRequest(num_images=2, seed=7),
                              metadata=(("application", app["name"]),), timeout=60)
    # one model behind both protocols: same seed, same version, the same PNG bytes
    assert list(reply.seeds) == [7, 8] and reply.model_version == body["model_version"]
    assert list(reply.images) == [base64.b64decode(b) for b in body["images"]]
