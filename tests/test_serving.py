"""Ray Serve: real HTTP and gRPC calls on 127.0.0.1 against one local Serve per module (free ports)."""

import base64
import io
import shutil
import socket

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file
from torchvision.io import decode_png, encode_png

from aigc_ray.models.checkpoint import model_version
from aigc_ray.serving.proto import aigc_pb2, aigc_pb2_grpc

MAX_IMAGES = 16
MAX_BODY = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(gan: str, vae: str) -> dict:
    return {"checkpoints": [f"gan={gan}", f"vae={vae}"], "max_num_images": MAX_IMAGES, "max_batch_images": 8,
            "max_body_bytes": MAX_BODY, "request_timeout_s": 60, "min_replicas": 1, "max_replicas": 1,
            "replica_cpus": 0.5}


@pytest.fixture(scope="module")
def server(ray_session, trained_checkpoint, trained_vae_checkpoint):
    from ray import serve

    from aigc_ray.serving import app

    http_port, grpc_port = _free_port(), _free_port()
    app.start(host="127.0.0.1", http_port=http_port, grpc_port=grpc_port, request_timeout_s=60)
    app.deploy(_args(trained_checkpoint, trained_vae_checkpoint))
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
        yield {"http": client, "grpc": channel, "gan": trained_checkpoint, "vae": trained_vae_checkpoint, "app": app}
    channel.close()
    serve.shutdown()


def _png_text(png: bytes) -> dict[str, str]:
    """tEXt chunks of a PNG, parsed by hand so the test does not trust our own writer."""
    out, i = {}, 8
    while i < len(png):
        length = int.from_bytes(png[i:i + 4], "big")
        kind, body = png[i + 4:i + 8], png[i + 8:i + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        i += 12 + length
    return out


def test_generate_http(server):
    r = server["http"].post("/v1/generate", json={"num_images": 3, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    version = model_version(server["gan"])
    assert body["model"] == "gan" and body["model_version"] == version and body["seeds"] == [7, 8, 9]
    pngs = [base64.b64decode(s) for s in body["images"]]
    assert [tuple(decode_png(torch.frombuffer(bytearray(p), dtype=torch.uint8)).shape) for p in pngs] == [(1, 8, 8)] * 3
    text = _png_text(pngs[1])
    assert text["Model-Version"] == version and text["Seed"] == "8" and text["AI-Generated"].startswith("true")


def test_same_seed_same_bytes_and_random_seed_reported(server):
    http = server["http"]
    a = http.post("/v1/generate", json={"num_images": 4, "seed": 123}).json()
    b = http.post("/v1/generate", json={"num_images": 2, "seed": 125}).json()  # batched differently
    assert a["images"][2:] == b["images"]
    c = http.post("/v1/generate", json={"num_images": 2}).json()
    assert len(c["seeds"]) == 2 and c["seeds"][1] == c["seeds"][0] + 1
    again = http.post("/v1/generate", json={"num_images": 2, "seed": c["seeds"][0]}).json()
    assert again["images"] == c["images"]
    # gRPC returns the very same bytes for the same seed and version
    resp = aigc_pb2_grpc.GeneratorStub(server["grpc"]).Generate(aigc_pb2.GenerateRequest(num_images=4, seed=123), timeout=60)
    assert resp.model_version == a["model_version"] and list(resp.seeds) == [123, 124, 125, 126]
    assert [base64.b64encode(p).decode() for p in resp.images] == a["images"]


def test_generate_npy_and_grid(server):
    http = server["http"]
    npy = http.post("/v1/generate", json={"num_images": 2, "seed": 1, "format": "npy"}).json()
    arr = np.load(io.BytesIO(base64.b64decode(npy["npy"])))
    assert arr.shape == (2, 1, 8, 8) and arr.dtype == np.uint8
    grid = http.post("/v1/generate", json={"num_images": 4, "seed": 1, "grid": True})
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert grid.headers["x-model-version"] == npy["model_version"]
    assert _png_text(grid.content)["AI-Generated"].startswith("true")


def test_interpolate(server):
    r = server["http"].post("/v1/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ends = server["http"].post("/v1/generate", json={"num_images": 2, "seed": 1}).json()["images"]
    assert len(body["images"]) == 5 and body["seeds"] == [1, 2]
    # the path starts at seed_a's image and ends at seed_b's (pixels equal; metadata differs)
    first, last = (decode_png(torch.frombuffer(bytearray(base64.b64decode(body["images"][i])), dtype=torch.uint8))
                   for i in (0, -1))
    a, b = (decode_png(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)) for s in ends)
    assert (first.int() - a.int()).abs().max() <= 1 and (last.int() - b.int()).abs().max() <= 1


def test_reconstruct_http_and_grpc(server):
    img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    img[:, 2:6, 3:5] = 255
    png = encode_png(img).numpy().tobytes()
    r = server["http"].post("/v1/reconstruct", json={"model": "vae", "images": [base64.b64encode(png).decode()] * 2})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == model_version(server["vae"]) and len(r.json()["images"]) == 2
    resp = aigc_pb2_grpc.GeneratorStub(server["grpc"]).Reconstruct(aigc_pb2.ReconstructRequest(model="vae", images=[png]),
                                                                   timeout=60)
    assert base64.b64encode(resp.images[0]).decode() == r.json()["images"][0]


def test_models_and_health(server):
    models = server["http"].get("/v1/models").json()
    by_name = {m["name"]: m for m in models["models"]}
    assert models["default"] == "gan"
    assert by_name["gan"]["version"] == model_version(server["gan"]) and by_name["gan"]["family"] == "dcgan"
    assert by_name["vae"]["family"] == "vae" and by_name["vae"]["last_error"] == ""
    assert server["http"].get("/healthz").json()["status"] == "ok"
    assert server["http"].get("/docs").status_code == 200
    health = health_pb2_grpc.HealthStub(server["grpc"])
    for service in ("", "aigc.v1.Generator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = aigc_pb2_grpc.GeneratorStub(server["grpc"]).ListModels(aigc_pb2.ListModelsRequest(), timeout=60)
    assert [m.name for m in listed.models] == ["gan", "vae"]


def _b64_png(size: int) -> str:
    return base64.b64encode(encode_png(torch.zeros(1, size, size, dtype=torch.uint8)).numpy().tobytes()).decode()


BAD_HTTP = [
    ("/v1/generate", {"num_images": 0}, "num_images"),
    ("/v1/generate", {"num_images": -3}, "num_images"),
    ("/v1/generate", {"num_images": MAX_IMAGES + 1}, "num_images"),
    ("/v1/generate", {"num_images": 10**30}, "num_images"),
    ("/v1/generate", {"num_images": "many"}, "num_images"),
    ("/v1/generate", {"seed": -1}, "seed"),
    ("/v1/generate", {"model": "nope"}, "model"),
    ("/v1/generate", {"labels": [3]}, "labels"),  # unconditional model
    ("/v1/generate", {"num_images": 3, "labels": [1, 2]}, "labels"),
    ("/v1/generate", {"format": "gif"}, "format"),
    ("/v1/interpolate", {"seed_a": 1}, "seed_b"),
    ("/v1/interpolate", {"seed_a": 1, "seed_b": 2, "steps": 1}, "steps"),
    ("/v1/interpolate", {"seed_a": 1, "seed_b": 2, "steps": MAX_IMAGES + 1}, "steps"),
    ("/v1/reconstruct", {"model": "vae"}, "images"),
    ("/v1/reconstruct", {"model": "vae", "images": ["not base64!"]}, "images[0]"),
    ("/v1/reconstruct", {"model": "vae", "images": [base64.b64encode(b"not a png").decode()]}, "images[0]"),
    ("/v1/reconstruct", {"model": "vae", "images": [_b64_png(16)]}, "images[0]"),
    ("/v1/reconstruct", {"model": "gan", "images": [_b64_png(8)]}, "model"),  # a GAN has no encoder
    ("/v1/reconstruct", {"model": "vae", "images": [_b64_png(8)] * (MAX_IMAGES + 1)}, "images"),
]


@pytest.mark.parametrize("path,body,field", BAD_HTTP, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD_HTTP)])
def test_bad_http_input_is_4xx_naming_the_field(server, path, body, field):
    r = server["http"].post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"].startswith(field) or f"{field}:" in r.json()["error"], r.text


def test_malformed_and_oversized_bodies(server):
    http = server["http"]
    r = http.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = http.post("/v1/reconstruct", json={"model": "vae", "images": ["A" * MAX_BODY]})
    assert r.status_code == 413 and "body" in r.json()["error"]


BAD_GRPC = [
    ("Generate", aigc_pb2.GenerateRequest(num_images=0), "num_images"),
    ("Generate", aigc_pb2.GenerateRequest(num_images=MAX_IMAGES + 1), "num_images"),
    ("Generate", aigc_pb2.GenerateRequest(num_images=1, seed=-5), "seed"),
    ("Generate", aigc_pb2.GenerateRequest(num_images=1, model="nope"), "model"),
    ("Generate", aigc_pb2.GenerateRequest(num_images=1, labels=[4]), "labels"),
    ("Interpolate", aigc_pb2.InterpolateRequest(seed_a=1, seed_b=2, steps=0), "steps"),
    ("Reconstruct", aigc_pb2.ReconstructRequest(model="vae"), "images"),
    ("Reconstruct", aigc_pb2.ReconstructRequest(model="vae", images=[b"junk"]), "images[0]"),
]


@pytest.mark.parametrize("method,request_,field", BAD_GRPC, ids=[f"{m}-{f}-{i}" for i, (m, _, f) in enumerate(BAD_GRPC)])
def test_bad_grpc_input_is_invalid_argument(server, method, request_, field):
    stub = aigc_pb2_grpc.GeneratorStub(server["grpc"])
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_checkpoint_swap_in_place_and_broken_uri_keeps_old(server, tmp_path):
    """Runs last in the module: it changes what is served."""
    http, app = server["http"], server["app"]
    old = model_version(server["gan"])
    swapped = tmp_path / "run-b" / "checkpoint_b"
    shutil.copytree(server["gan"], swapped)
    weights = load_file(str(swapped / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(swapped / "model.safetensors"))
    new = model_version(swapped)
    assert new != old

    app.deploy(_args(f"file://{swapped}", server["vae"]))  # a URI through pyarrow's filesystem
    r = http.post("/v1/generate", json={"num_images": 1, "seed": 7}).json()
    assert r["model_version"] == new and _png_text(base64.b64decode(r["images"][0]))["Model-Version"] == new

    app.deploy(_args(str(tmp_path / "does-not-exist"), server["vae"]))
    gan = next(m for m in http.get("/v1/models").json()["models"] if m["name"] == "gan")
    assert gan["version"] == new and "does-not-exist" in gan["last_error"] and "still serving" in gan["last_error"]
    r = http.post("/v1/generate", json={"num_images": 1, "seed": 7})
    assert r.status_code == 200 and r.json()["model_version"] == new
