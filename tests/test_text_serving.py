"""Text generation through Ray: a tiny gpt trained by Ray Train (shared by the module), its run layout and
quality card, then served next to an image model by Ray Serve: real HTTP on 127.0.0.1."""

import json
import socket

import httpx
import pytest
from waits import wait_until

from aigc_ray.text_config import TextExperimentConfig

MAX_NEW_TOKENS, MAX_PROMPT = 4000, 200


def tiny_text_config(tmp_path, **overrides) -> TextExperimentConfig:
    cfg = TextExperimentConfig.from_dict({
        "data": {"dataset": "stdlib", "data_root": str(tmp_path / "data")},
        "model": {"family": "gpt", "width": 32, "depth": 1, "block_size": 32, "options": {"heads": 2}},
        "train": {"epochs": 2, "steps_per_epoch": 15, "batch_size": 8, "warmup_steps": 5, "cpus_per_worker": 1,
                  "out": str(tmp_path / "runs"), "max_failures": 0, "name": "tiny-gpt"},
        "eval": {"max_blocks": 16, "sample_tokens": 20}})
    return cfg.with_overrides(overrides) if overrides else cfg


@pytest.fixture(scope="module")
def text_run(ray_session, tmp_path_factory):
    from aigc_ray.train.text_loop import run_text_training

    tmp = tmp_path_factory.mktemp("text")
    return tmp, run_text_training(tiny_text_config(tmp))


def test_train_writes_the_run_layout_and_a_card_with_interval_and_baselines(text_run):
    from pathlib import Path

    tmp, outcome = text_run
    run = Path(outcome.run_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2] and lines[-1]["step"] == 30
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((Path(outcome.checkpoint) / "card.json").read_text())
    m = card["metrics"]
    assert m["val_bpb_lo"] < m["val_bpb"] < m["val_bpb_hi"] and card["protocol"]["blocks"] == 16
    assert set(card["baselines"]) == {"unigram", "bigram"}
    assert card["baselines"]["bigram"]["val_bpb"] < card["baselines"]["unigram"]["val_bpb"]
    assert (Path(outcome.checkpoint) / "samples.txt").read_text().startswith("def ")
    config = json.loads((Path(outcome.checkpoint) / "config.json").read_text())
    assert config["modality"] == "text" and config["vocab"] == {"kind": "bytes", "size": 256}


def test_rerun_with_the_same_name_resumes(text_run):
    from aigc_ray.train.text_loop import run_text_training

    tmp, first = text_run
    outcome = run_text_training(tiny_text_config(tmp, **{"train.epochs": 3}))
    lines = [json.loads(x) for x in open(f"{outcome.run_dir}/metrics.jsonl").read().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3] and lines[-1]["step"] == 45  # 30 steps were not redone


# ---- serving: a text model beside an image one ---------------------------------------------------------

TOKEN = "text-test-token"
GRPC: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, trained_checkpoint, text_run, tmp_path_factory):
    from ray import serve

    from aigc_ray.serving import app

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    http_port, grpc_port = _free_port(), _free_port()
    GRPC["target"] = f"127.0.0.1:{grpc_port}"
    app.start(host="127.0.0.1", http_port=http_port, grpc_port=grpc_port, request_timeout_s=60)
    # the image model runs in the ingress, the text model in its own deployment (reached through a handle)
    app.deploy({"checkpoints": [f"gan={trained_checkpoint}", f"text={text_run[1].checkpoint}"],
                "max_new_tokens": MAX_NEW_TOKENS, "max_prompt_chars": MAX_PROMPT, "min_replicas": 1,
                "max_replicas": 1, "replica_cpus": 0.5, "api_token_file": str(token_file),
                "max_ongoing_requests": 2, "max_queued_requests": 2})  # small, so a burst overloads the text model
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60,
                      headers={"authorization": f"Bearer {TOKEN}"}) as client:
        yield client
    serve.shutdown()


def _events(body: str) -> list[tuple[str, dict]]:
    """Server-sent events parsed by hand: (event name, data)."""
    out = []
    for chunk in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_complete_is_labelled_and_the_same_seed_gives_the_same_text(server):
    body = {"prompt": "def f(x):\n    return ", "max_new_tokens": 40, "seed": 3, "temperature": 1.0}
    first = server.post("/v1/complete", json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert first.headers["x-ai-generated"] == "true" and out["ai_generated"].startswith("true")
    assert out["model"] == "text" and out["tokens"] == 40 and out["finish_reason"] == "length" and out["seed"] == 3
    assert server.post("/v1/complete", json=body).json()["text"] == out["text"]
    assert server.post("/v1/complete", json={**body, "seed": 4}).json()["text"] != out["text"]
    assert httpx.post(f"{server.base_url}/v1/complete", json=body).status_code == 401  # no token


def test_the_stream_sends_pieces_as_events_and_the_same_text(server):
    body = {"prompt": "import ", "max_new_tokens": 30, "seed": 5, "top_k": 20, "top_p": 0.9}
    whole = server.post("/v1/complete", json=body).json()
    streamed = server.post("/v1/complete", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["x-ai-generated"] == "true"
    events = _events(streamed.text)
    assert events[0][0] == "start" and events[-1][0] == "done" and len(events) > 3
    assert "".join(e["text"] for kind, e in events if kind == "message") == whole["text"]
    assert events[-1][1]["ai_generated"].startswith("true") and events[-1][1]["tokens"] == 30


def test_bad_text_requests_are_4xx_naming_the_field(server):
    cases = [({"prompt": "x" * (MAX_PROMPT + 1)}, 422, "prompt"),
             ({"prompt": "x", "max_new_tokens": MAX_NEW_TOKENS + 1}, 422, "max_new_tokens"),
             ({"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
             ({"prompt": "x", "temperature": -1}, 422, "temperature"),
             ({"prompt": "x", "top_p": 0}, 422, "top_p"),
             ({"prompt": "x", "model": "nope"}, 404, "model"),
             ({"prompt": "x", "model": "gan"}, 422, "model: gan is an image model"),
             ({"prompt": 3}, 422, "prompt")]
    for body, status, field in cases:
        r = server.post("/v1/complete", json=body)
        assert r.status_code == status and field in r.json()["error"], (body, r.status_code, r.text)
    r = server.post("/v1/generate", json={"model": "text", "num_images": 1})
    assert r.status_code == 422 and "model: text is a text model" in r.json()["error"]
    r = server.post("/v1/complete", json={"prompt": "naïve ☃ 🐍 ", "max_new_tokens": 5, "seed": 1})
    assert r.status_code == 200  # any character is in a byte vocabulary: its UTF-8 bytes


def test_openapi_states_the_text_limits_and_models_list_the_modality(server):
    schema = server.get("/openapi.json").json()
    props = schema["components"]["schemas"]["CompleteBody"]["properties"]
    assert props["max_new_tokens"]["maximum"] == MAX_NEW_TOKENS and props["prompt"]["maxLength"] == MAX_PROMPT
    models = {m["name"]: m for m in server.get("/v1/models").json()["models"]}
    assert models["text"]["modality"] == "text" and models["gan"]["modality"] == "image"
    assert models["text"]["card"]["metrics"]["val_bpb"] > 0


def test_a_client_that_disconnects_stops_its_generation(server):
    def streams() -> dict:
        return next(m for m in server.get("/v1/models").json()["models"] if m["name"] == "text")["text_streams"]

    before = streams()
    body = {"prompt": "class ", "max_new_tokens": MAX_NEW_TOKENS, "seed": 1, "stream": True}
    with httpx.Client(base_url=str(server.base_url), headers=server.headers, timeout=60) as client:
        with client.stream("POST", "/v1/complete", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the start event: generation is under way
    # the connection is closed: the model's stream ends well before MAX_NEW_TOKENS bytes
    wait_until(lambda: streams()["cancelled"] > before["cancelled"] and streams()["active"] == 0, timeout_s=20,
               what="the disconnected stream to stop")
    assert streams()["tokens"] - before["tokens"] < MAX_NEW_TOKENS


def test_a_burst_of_completions_is_shed_with_503_and_retry_after(server):
    """The text model takes 2 completions at a time and queues 2 more: of 24 streams at once, the rest are refused
    at once (503, Retry-After, the field named), never a 500 or a hang; afterwards it answers again."""
    import asyncio

    body = {"prompt": "def ", "max_new_tokens": 300, "temperature": 1.0, "stream": True}

    async def burst():
        async with httpx.AsyncClient(base_url=str(server.base_url), headers=server.headers, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post("/v1/complete", json={**body, "seed": i}) for i in range(24)))

    answers = asyncio.run(burst())
    assert {r.status_code for r in answers} <= {200, 503}, [r.text for r in answers if r.status_code not in (200, 503)]
    shed = [r for r in answers if r.status_code == 503]
    assert shed and len(shed) < len(answers), [r.status_code for r in answers]
    assert all(r.headers.get("retry-after") for r in shed) and "model: overloaded" in shed[0].json()["error"]
    done = [r for r in answers if r.status_code == 200]
    assert all(_events(r.text)[-1][0] == "done" for r in done)  # a stream that was taken ran to its end
    assert server.post("/v1/complete", json={**body, "stream": False}).status_code == 200


def test_grpc_complete_streams_the_same_text_and_refuses_bad_input(server):
    import grpc

    from aigc_ray.serving.proto import aigc_pb2, aigc_pb2_grpc

    metadata = [("authorization", f"Bearer {TOKEN}")]
    # 0.5 and 0.75 are exact in float32 (the proto's type) and in JSON's double: the same sampling settings
    body = {"prompt": "import ", "max_new_tokens": 30, "seed": 5, "top_k": 20, "top_p": 0.75, "temperature": 0.5}
    with grpc.insecure_channel(GRPC["target"]) as channel:
        stub = aigc_pb2_grpc.GeneratorStub(channel)
        chunks = list(stub.Complete(aigc_pb2.CompleteRequest(**body), metadata=metadata, timeout=60))
        assert chunks[0].ai_generated.startswith("true") and chunks[0].model == "text"
        assert chunks[-1].done and chunks[-1].tokens == 30 and len(chunks) > 3
        assert "".join(c.text for c in chunks) == server.post("/v1/complete", json=body).json()["text"]
        for request, field in ((aigc_pb2.CompleteRequest(prompt="x", max_new_tokens=MAX_NEW_TOKENS + 1), "max_new_tokens"),
                               (aigc_pb2.CompleteRequest(prompt="x", model="gan"), "model")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Complete(request, metadata=metadata, timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # no token
            list(stub.Complete(aigc_pb2.CompleteRequest(prompt="x"), timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_http_client_prints_the_stream(server):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "serve/client_http.py", "--url", str(server.base_url).rstrip("/"),
                          "--prompt", "def ", "--max-new-tokens", "20", "--seed", "2"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "AIGC_API_TOKEN": TOKEN})
    assert out.returncode == 0, out.stderr
    assert out.stdout and "20 tokens" in out.stderr and "AI-generated: true" in out.stderr


def test_a_text_canary_gets_its_share_streams_included_and_rolls_back(server, text_run, tmp_path, capsys):
    """Runs last in the module (it changes what is served): `promote --canary` of a text candidate (the served
    checkpoint with other weights, its card claiming better bits/byte) sends its share of /v1/complete, plain
    and streamed, to the candidate; --rollback sends everything back to the current version."""
    import shutil
    from collections import Counter

    from safetensors.torch import load_file, save_file

    from aigc_ray.cli import main as cli_main
    from aigc_ray.models.text_checkpoint import text_model_version

    served = text_run[1].checkpoint
    better = tmp_path / "better"
    shutil.copytree(served, better)
    weights = load_file(str(better / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}, str(better / "model.safetensors"))
    card = json.loads((better / "card.json").read_text())
    card["metrics"] = {k: v * 0.8 for k, v in card["metrics"].items()}
    card["per_block"]["val_bpb"] = [b * 0.8 for b in card["per_block"]["val_bpb"]]
    (better / "card.json").write_text(json.dumps(card))
    old, new = text_model_version(served), text_model_version(better)

    assert cli_main(["promote", "--model", "text", "--checkpoint", str(better), "--served", served,
                     "--canary", "50"]) == 0
    assert "serves 50% of text's requests" in capsys.readouterr().out
    body = {"prompt": "def ", "max_new_tokens": 4, "temperature": 1.0}
    # the ingress reads the canary's record within half a second: from the candidate's first answer on, it
    # gets every other request (50%)
    wait_until(lambda: server.post("/v1/complete", json=body).json()["model_version"] == new, 30,
               "a completion from the candidate", poll_s=0.05)
    plain = [server.post("/v1/complete", json={**body, "seed": i}) for i in range(12)]
    assert all(r.status_code == 200 for r in plain), [r.text for r in plain if r.status_code != 200][:2]
    streamed = []
    for i in range(4):
        with server.stream("POST", "/v1/complete", json={**body, "seed": i, "stream": True}) as r:
            assert r.status_code == 200
            streamed.append(_events(r.read().decode())[0][1]["model_version"])  # the header names the version
    versions = Counter([r.json()["model_version"] for r in plain] + streamed)
    assert set(versions) == {old, new} and versions[new] == 8, versions  # every other request: 8 of 16
    status = next(m for m in server.get("/v1/models").json()["models"] if m["name"] == "text")["canary"]
    assert status["state"] == "running" and status["version"] == new and status["requests"] >= 9
    assert status["errors"] == 0

    assert cli_main(["promote", "--model", "text", "--rollback"]) == 0
    after = {server.post("/v1/complete", json={**body, "seed": i}).json()["model_version"] for i in range(6)}
    assert after == {old}
    assert next(m for m in server.get("/v1/models").json()["models"] if m["name"] == "text")["canary"] is None
