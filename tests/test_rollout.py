"""`aigc-ray promote` against a running Serve app (real Serve, HTTP on 127.0.0.1): the gate refuses a worse
candidate and nothing changes; a better one is swapped in; canaries get their share, end without losing a
request, and roll back by themselves when the candidate fails. The tests share one app and run in order."""

import asyncio
import concurrent.futures
import shutil
import socket
import threading
from collections import Counter

import httpx
import pytest
from safetensors.torch import load_file, save_file
from waits import wait_until

from aigc_ray.cli import main as cli_main
from aigc_ray.models.checkpoint import model_version, read_card, write_card


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _variant(src, dst, shift: float, fid_factor: float) -> str:
    """A copy of `src` with other weights (another version) whose card says its FID is `fid_factor` x src's."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    save_file({k: v + shift if v.is_floating_point() else v for k, v in weights.items()}, str(dst / "model.safetensors"))
    card = read_card(dst)
    card["metrics"]["fid"] *= fid_factor  # the mean, its interval and the draws it is the mean of
    card["intervals"]["fid"] = [v * fid_factor for v in card["intervals"]["fid"]]
    card["draws"]["fid"] = [v * fid_factor for v in card["draws"]["fid"]]
    card["model_version"] = model_version(dst)
    write_card(dst, card)
    return str(dst)


ARGS = {"max_num_images": 4, "min_replicas": 1, "max_replicas": 1, "replica_cpus": 0.5, "request_timeout_s": 60}


@pytest.fixture(scope="module")
def app(ray_session, trained_checkpoint, tmp_path_factory):
    from pathlib import Path

    from ray import serve

    from aigc_ray.serving import app as serving_app

    tmp = tmp_path_factory.mktemp("rollout")
    port = _free_port()
    serving_app.start(host="127.0.0.1", http_port=port, grpc_port=_free_port(), request_timeout_s=60)
    serving_app.deploy({**ARGS, "checkpoints": [f"gan={trained_checkpoint}"]})
    src = Path(trained_checkpoint)
    ckpts = {"served": trained_checkpoint, "worse": _variant(src, tmp / "worse", 0.01, 1.5),
             "better": _variant(src, tmp / "better", 0.02, 0.5), "best": _variant(src, tmp / "best", 0.03, 0.25),
             "flaky": _variant(src, tmp / "flaky", 0.05, 0.5)}
    broken = Path(_variant(src, tmp / "broken", 0.04, 0.1))
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # its card is fine, its weights don't load
    ckpts["broken"] = str(broken)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield {"http": client, "url": f"http://127.0.0.1:{port}", "ckpt": ckpts,
               "version": {k: model_version(v) for k, v in ckpts.items()}}
    serve.shutdown()


def _served(http) -> dict:
    return next(m for m in http.get("/v1/models").json()["models"] if m["name"] == "gan")


def _load(url: str, total: int | None = None, stop: threading.Event | None = None, concurrency: int = 16,
          out: list | None = None) -> list:
    """(status, model_version) of each request of `concurrency` clients: `total` requests, or until `stop`.
    Answers are appended to `out` as they come, so a caller can wait on them."""
    out = [] if out is None else out

    async def run():
        sent = 0

        async def worker(client):
            nonlocal sent
            while (total is None and not stop.is_set()) or (total is not None and sent < total):
                sent += 1
                r = await client.post(f"{url}/v1/generate", json={"num_images": 1, "seed": sent})
                out.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return out
    return asyncio.run(run())


def _answers_after(out: list, n: int, count: int = 16, timeout_s: float = 60) -> None:
    """Wait until the load has `count` more answers than `n`: requests went on across the switch."""
    wait_until(lambda: len(out) >= n + count, timeout_s, f"{count} answers after the first {n}")


def _during(app, argv: list[str]) -> tuple[int, list]:
    """Run `aigc-ray promote ARGV` while 16 clients call the app (answered before, during and after it);
    (exit code, every response)."""
    stop, out = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(_load, app["url"], None, stop, out=out)
        try:
            _answers_after(out, 0)
            code = cli_main(["promote", "--model", "gan", *argv])
            _answers_after(out, len(out))
        finally:
            stop.set()
        return code, load.result()


def test_an_app_without_an_encoder_does_not_offer_reconstruct(app):
    """schemathesis found a schema-valid /v1/reconstruct refused with 422 by an app of GANs alone."""
    r = app["http"].post("/v1/reconstruct", json={"images": [""]})
    assert r.status_code == 404 and r.json()["error"].startswith("model: no served model can reconstruct"), r.text
    assert "/v1/reconstruct" not in app["http"].get("/openapi.json").json()["paths"]


def test_a_worse_candidate_is_refused_and_nothing_changes(app, capsys):
    from aigc_ray.serving import rollout

    before = rollout.find("aigc").args
    assert cli_main(["promote", "--model", "gan", "--checkpoint", app["ckpt"]["worse"], "--url", app["url"]]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "nothing changed" in out and app["version"]["worse"] in out
    assert cli_main(["promote", "--model", "gan", "--checkpoint", app["ckpt"]["worse"], "--canary", "10"]) == 1
    assert rollout.find("aigc").args == before
    assert _served(app["http"])["version"] == app["version"]["served"] and _served(app["http"])["canary"] is None
    assert {v for _, v in _load(app["url"], 32)} == {app["version"]["served"]}


def test_a_canary_gets_its_share_and_rolls_back_without_losing_a_request(app, capsys):
    assert cli_main(["promote", "--model", "gan", "--checkpoint", app["ckpt"]["better"], "--canary", "10"]) == 0
    assert "serves 10% of gan's requests" in capsys.readouterr().out
    responses = _load(app["url"], 200)
    assert {s for s, _ in responses} == {200}
    versions = Counter(v for _, v in responses)
    assert set(versions) == {app["version"]["served"], app["version"]["better"]}
    share = versions[app["version"]["better"]] / len(responses)
    assert 0.05 <= share <= 0.15, versions
    status = _served(app["http"])["canary"]
    assert status["state"] == "running" and status["version"] == app["version"]["better"] and status["percent"] == 10
    assert status["requests"] >= 15 and status["errors"] == 0
    print(f"canary share {share:.3f} of {len(responses)}")

    code, during = _during(app, ["--rollback"])
    assert code == 0 and {s for s, _ in during} == {200}, Counter(s for s, _ in during)
    assert {v for _, v in _load(app["url"], 32)} == {app["version"]["served"]}
    assert _served(app["http"])["canary"] is None
    print(f"rollback: {len(during)} requests during the switch, none lost")


def test_a_canary_whose_candidate_fails_rolls_back_by_itself(app, capsys):
    """The candidate's replica dies and its replacement can't load the checkpoint (gone meanwhile): its requests
    get no answer within --canary-timeout, each is answered by the current version, and past the error rate the
    ingress sends everything to the current version by itself."""
    from pathlib import Path

    from test_serving import _kill_replicas

    flaky = app["ckpt"]["flaky"]
    argv = ["--checkpoint", flaky, "--canary", "50", "--max-error-rate", "0.01", "--min-requests", "5",
            "--canary-timeout", "2"]
    assert cli_main(["promote", "--model", "gan", *argv]) == 0
    stop, out = threading.Event(), []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(_load, app["url"], None, stop, out=out)
        try:
            wait_until(lambda: app["version"]["flaky"] in {v for _, v in out}, 60, "an answer from the canary")
            (Path(flaky) / "model.safetensors").unlink()
            assert _kill_replicas("model-gan-canary") == 1
            wait_until(lambda: (_served(app["http"])["canary"] or {}).get("state") == "rolled_back", 60,
                       "the ingress to roll the failing canary back")
            _answers_after(out, len(out))  # and the current version answers everything after it
        finally:
            stop.set()
        during = load.result()
    assert {s for s, _ in during} == {200}, Counter(s for s, _ in during)  # its failures were answered by current
    assert app["version"]["flaky"] in {v for _, v in during}
    status = _served(app["http"])["canary"]
    assert status["state"] == "rolled_back" and "automatic rollback" in status["reason"] and status["errors"] >= 1
    assert {v for _, v in _load(app["url"], 32)} == {app["version"]["served"]}
    assert cli_main(["promote", "--model", "gan", "--finish"]) == 2  # nothing to finish: it was rolled back
    assert "automatic rollback" in capsys.readouterr().err
    assert cli_main(["promote", "--model", "gan", "--rollback"]) == 0
    assert _served(app["http"])["canary"] is None


def test_a_candidate_that_fails_to_load_leaves_the_app_serving(app, capsys):
    code, during = _during(app, ["--checkpoint", app["ckpt"]["broken"], "--canary", "10"])
    assert code == 2 and "rollout failed" in capsys.readouterr().err
    assert {s for s, _ in during} == {200} and {v for _, v in during} == {app["version"]["served"]}
    assert _served(app["http"])["canary"] is None


def test_finishing_a_canary_promotes_the_candidate_without_losing_a_request(app):
    assert cli_main(["promote", "--model", "gan", "--checkpoint", app["ckpt"]["better"], "--canary", "20"]) == 0
    code, during = _during(app, ["--finish"])
    assert code == 0 and {s for s, _ in during} == {200}, Counter(s for s, _ in during)
    served = _served(app["http"])
    assert served["version"] == app["version"]["better"] and served["canary"] is None and not served["degraded"]
    assert {v for _, v in _load(app["url"], 32)} == {app["version"]["better"]}
    print(f"finish: {len(during)} requests during the switch, none lost")


def test_tune_promote_swaps_the_sweeps_best_into_the_app(app, monkeypatch, capsys):
    """`aigc-ray tune --promote NAME` ends with the gate and swap (the sweep itself replaced by its outcome)."""
    from pathlib import Path
    from types import SimpleNamespace

    from aigc_ray.tuning import sweep

    spec = str(Path(__file__).resolve().parents[1] / "tune" / "dcgan_asha.yaml")
    outcome = SimpleNamespace(interrupted=False, exported=app["ckpt"]["best"], best=object())
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, **kw: outcome)
    monkeypatch.setattr(sweep, "format_table", lambda o: "(table)")
    assert cli_main(["tune", "--spec", spec, "--smoke-test", "--promote", "gan"]) == 2
    assert "--promote: the sweep must run on the Ray cluster" in capsys.readouterr().err
    assert cli_main(["tune", "--spec", spec, "--smoke-test", "--address", "auto",
                     "--promote", "gan"]) == 0
    assert "promoted: gan serves" in capsys.readouterr().out
    assert _served(app["http"])["version"] == app["version"]["best"]


def test_a_better_candidate_is_swapped_into_a_serve_deploy_app(app, capsys):
    """The app is redeployed through Serve's REST API (what `serve deploy` does); promote then changes it there."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from aigc_ray.serving import rollout

    rollout.connect(None)
    client = ServeSubmissionClient(rollout._dashboard(None))
    details = client.get_serve_details()
    args = {**ARGS, "checkpoints": [f"gan={app['ckpt']['better']}"]}
    client.deploy_applications({"http_options": details["http_options"], "applications": [
        {"name": "aigc", "route_prefix": "/", "import_path": "aigc_ray.serving.app:build_app", "args": args}]})
    wait_until(lambda: client.get_serve_details()["applications"]["aigc"]["status"] == "RUNNING", 120,
               "the serve deploy of the app to finish", poll_s=0.5)
    assert rollout.find("aigc").source == "declarative"
    assert cli_main(["promote", "--model", "gan", "--checkpoint", app["ckpt"]["best"]]) == 0
    out = capsys.readouterr().out
    assert "promoted" in out and "serve deploy" in out
    applied = client.get_serve_details()["applications"]["aigc"]["deployed_app_config"]
    assert applied["deployments"] == [{"name": "model-gan", "user_config": {"checkpoint": app["ckpt"]["best"]}}]
    assert rollout.find("aigc").args["checkpoints"] == [f"gan={app['ckpt']['best']}"]
    assert _served(app["http"])["version"] == app["version"]["best"]
