"""cluster.yaml and the KubeRay manifests: valid for this Ray, shaped as the README promises
(CPU head, GPU workers from zero, token auth, nothing public), and in step with serve/config.yaml.

cluster.yaml goes through Ray's own cluster-launcher checks (prepare_config + validate_config,
what `ray up` runs before it talks to the cloud), offline; its `ray start` lines are parsed by
the installed `ray start` command itself.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
SERVE_CONFIG = ROOT / "serve" / "config.yaml"


def manifest(name: str) -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / name).read_text()))
    assert len(docs) == 1, f"deploy/{name}: one resource expected, found {len(docs)}"
    return docs[0]


# --- cluster.yaml --------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(CLUSTER))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_has_a_cpu_head_and_gpu_workers_scaling_from_zero():
    types = CLUSTER["available_node_types"]
    head = types[CLUSTER["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 4
    gpu_types = [t for name, t in types.items() if name != CLUSTER["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for t in gpu_types:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    assert CLUSTER["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    assert CLUSTER["docker"]["head_image"].endswith("-cpu") and CLUSTER["docker"]["worker_image"].endswith("-gpu")


def test_cluster_nodes_run_this_ray_and_install_this_project():
    import ray

    for key in ("head_image", "worker_image"):
        assert f":{ray.__version__}-" in CLUSTER["docker"][key]
    assert CLUSTER["file_mounts"]["~/aigc-ray"] == "."
    assert any(re.search(r"pip install .*~/aigc-ray\b", c) for c in CLUSTER["setup_commands"])


def _ray_start_lines(key: str) -> list[str]:
    lines = [c for c in CLUSTER[key] if "ray start" in c]
    assert len(lines) == 1, key
    return lines[0].split(";")


def _parse_ray_start(line: str) -> dict:
    """Parse a `ray start ...` command line with the installed Ray's own CLI (no process starts)."""
    from ray.scripts.scripts import start

    args = shlex.split(line.strip())
    assert args[:2] == ["ray", "start"], line
    args = [a.replace("$RAY_HEAD_IP", "10.0.0.1") for a in args[2:]]
    with start.make_context("start", args) as ctx:
        return ctx.params


def test_token_auth_on_and_dashboard_only_on_loopback():
    head = _ray_start_lines("head_start_ray_commands")
    worker = _ray_start_lines("worker_start_ray_commands")
    for parts in (head, worker):
        assert "export RAY_AUTH_MODE=token" in [p.strip() for p in parts]
    head_params = _parse_ray_start(head[-1])
    assert head_params["head"] and head_params["dashboard_host"] == "127.0.0.1"
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert not _parse_ray_start(worker[-1])["head"]
    # the token file every node reads, copied from the laptop, never in the repository
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in CLUSTER["setup_commands"])
    assert not (ROOT / ".ray").exists()


def test_nothing_listens_on_a_public_address():
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    # the launcher's security group admits SSH from outside and intra-cluster traffic only; no
    # extra ingress rules, no published container ports
    assert "security_group" not in CLUSTER["provider"]
    for node_type in CLUSTER["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]
        assert "NetworkInterfaces" not in node_type["node_config"]  # (could ask for a public IP)
    assert not any(re.match(r"-p\b|--publish\b", opt) for opt in CLUSTER["docker"].get("run_options", []))


# --- KubeRay manifests -------------------------------------------------------------------

def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService")])
def test_kuberay_manifest_shape(name, kind):
    import ray

    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"].get("num-gpus") == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert "dashboard-host" not in head["rayStartParams"]  # KubeRay's default keeps it in the pod network
    images = {head_container["image"]}
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups += 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            assert group["minReplicas"] == 0
    assert gpu_groups >= 1, f"{name}: no GPU worker group"
    assert len(images) == 1, f"{name}: head and workers run different images {images}"
    # the image is the one deploy/Dockerfile builds, on this Ray
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    # nothing public: no LoadBalancer / NodePort anywhere, no Ingress
    text = (ROOT / "deploy" / name).read_text()
    assert not re.search(r"LoadBalancer|NodePort|kind:\s*Ingress|hostNetwork:\s*true|hostPort", text)


def test_rayjob_trains_with_this_cli_onto_shared_storage():
    from aigc_ray.cli import build_parser

    spec = manifest("rayjob.yaml")["spec"]
    args = build_parser().parse_args(shlex.split(spec["entrypoint"])[1:])
    assert args.command == "train" and args.gpu and args.workers >= 2
    assert re.match(r"(s3|gs)://", args.storage_path) and re.match(r"(s3|gs)://", args.data_root)
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_exactly_serve_config_yaml():
    served = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    wanted = yaml.safe_load(SERVE_CONFIG.read_text())
    # the one intended difference: in a pod the proxies bind the pod's address (ClusterIP only)
    assert served["http_options"].pop("host") == "0.0.0.0"
    wanted["http_options"].pop("host", None)
    assert served == wanted, "deploy/rayservice.yaml drifted from serve/config.yaml: run python deploy/sync_serve_config.py"
    check = subprocess.run([sys.executable, str(ROOT / "deploy" / "sync_serve_config.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for app in served["applications"]:
        module, _, attr = app["import_path"].partition(":")
        __import__(module)  # the image installs the package, so what Serve imports must exist
        assert hasattr(sys.modules[module], attr), app["import_path"]


def test_sync_script_rewrites_serve_config_v2_verbatim():
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        from sync_serve_config import for_pods, synced
    finally:
        sys.path.pop(0)
    manifest_text = (ROOT / "deploy" / "rayservice.yaml").read_text()
    config = "applications:\n  - name: x\n    import_path: a.b:c\n    args:\n      k: [1, 2]\n"
    out = synced(manifest_text, config)
    doc = yaml.safe_load(out)
    assert doc["spec"]["serveConfigV2"] == config
    pod = for_pods("proxy_location: EveryNode\nhttp_options:\n  host: 127.0.0.1  # local\n  port: 8000\n"
                   "grpc_options:\n  host: 127.0.0.1\n")
    assert yaml.safe_load(pod) == {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000},
                                   "grpc_options": {"host": "127.0.0.1"}}
    assert doc["spec"]["rayClusterConfig"] == manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    assert synced(out, config) == out  # idempotent
