"""Rolling a checkpoint into a running app: what `aigc-ray promote` does once its quality gate passes.

An app is deployed one of two ways, and is changed the same way it was deployed, through Serve's own APIs:

- `aigc-ray serve` deploys imperatively (`serve.run`, app.deploy), which keeps its args in Ray's GCS
  (remember_args). Promote connects to the same Ray and runs `serve.run` again with those args, changing
  only model NAME's checkpoint (or its canary).
- `serve deploy` goes through the REST API. Promote reads the applied config (GET /api/serve/applications/
  on the dashboard), changes the same field and applies it again (PUT), as `serve deploy` does, so the app
  stays declarative. Edit your config file as well, or the next `serve deploy` of the old one reverts it.

Model deployments have a version that ignores their checkpoint, so a new checkpoint reaches the running
replicas through reconfigure(): each loads and test-runs it before switching, without dropping a request,
and one that fails to load keeps serving the old (serving/model.py). Promote waits, with a bound, until the
replicas serve the candidate's version; if they can't, it puts the old args back and says why.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

from aigc_ray.serving import canary, lkg
from aigc_ray.serving.options import ServeOptions

APPS_NAMESPACE = "aigc_serve_apps"
WAIT_S = 180.0
DRAIN_S = 4 * canary.REFRESH_S + 1.0  # every ingress has stopped picking the candidate, its requests are done


class RolloutError(RuntimeError):
    """The app could not be changed, or the candidate did not come up; the message says why."""


def remember_args(app: str, args: dict) -> None:
    lkg.remember(app, {"args": args, "at": time.time()}, APPS_NAMESPACE)


@dataclass
class Deployed:
    app: str
    source: str
    """"imperative" (aigc-ray serve) or "declarative" (serve deploy)."""
    args: dict
    config: dict | None = None
    """The whole applied Serve config (declarative only): what a PUT must send again."""
    client: object | None = None


def connect(address: str | None) -> None:
    """Join the Ray cluster the app runs on (a running local one by default)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)


def _dashboard(explicit: str | None) -> str | None:
    url = explicit or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not url:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        url = getattr(node, "webui_url", None)
    if url and "://" not in url:
        url = f"http://{url}"
    return url


def find(app: str, dashboard: str | None = None) -> Deployed:
    """How `app` was deployed and with which args."""
    details, client = None, None
    url = _dashboard(dashboard)
    if url:
        try:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            client = ServeSubmissionClient(url)
            details = client.get_serve_details()
        except Exception:  # no dashboard: only an imperative app can be changed
            client, details = None, None
    info = ((details or {}).get("applications") or {}).get(app)
    if info and str(info.get("source", "")).lower().endswith("declarative") and info.get("deployed_app_config"):
        config = {k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity")
                  if details.get(k) is not None}
        config["applications"] = [copy.deepcopy(a["deployed_app_config"]) for a in details["applications"].values()
                                  if str(a.get("source", "")).lower().endswith("declarative")
                                  and a.get("deployed_app_config")]
        mine = next(a for a in config["applications"] if a.get("name") == app)
        args = copy.deepcopy(mine.get("args") or {})
        for override in mine.get("deployments") or []:  # a checkpoint override is what the model serves
            name = str(override.get("name", "")).removeprefix("model-")
            uri = (override.get("user_config") or {}).get("checkpoint")
            if uri and name in ServeOptions(**args).models():
                args = with_checkpoint(args, name, uri)
        return Deployed(app, "declarative", args, config, client)
    record = lkg.recall(app, APPS_NAMESPACE)
    if record and (details is None or info is not None):
        return Deployed(app, "imperative", record["args"])
    raise RolloutError(f"app: no Serve application {app!r} deployed by `aigc-ray serve` or `serve deploy` on this "
                       f"Ray cluster{'' if url else ' (and no dashboard address to ask: --dashboard)'}")


def apply(deployed: Deployed, args: dict) -> None:
    """Deploy `args` the way the app was deployed; Serve changes only what differs."""
    ServeOptions(**args)  # validate before anything changes
    if deployed.source == "imperative":
        from aigc_ray.serving import app as serving_app

        serving_app.deploy(args, name=deployed.app)
    else:
        config = copy.deepcopy(deployed.config)
        mine = next(a for a in config["applications"] if a.get("name") == deployed.app)
        served = ServeOptions(**args).models()
        same = {k: v for k, v in args.items() if k != "checkpoints"} == \
            {k: v for k, v in deployed.args.items() if k != "checkpoints"} and \
            list(served) == list(ServeOptions(**deployed.args).models())
        if not same:  # new args: Serve rebuilds the app (deployments whose version is unchanged stay up)
            mine["args"] = args
        overrides = {o.get("name"): o for o in mine.setdefault("deployments", [])}
        for name, uri in served.items():  # only checkpoints change: user_config overrides, updated in place
            override = overrides.get(f"model-{name}")
            if override is None and not same:
                continue
            if override is None:
                override = {"name": f"model-{name}"}
                mine["deployments"].append(override)
            override["user_config"] = {**(override.get("user_config") or {}), "checkpoint": uri}
        deployed.client.deploy_applications(config)
        deployed.config = config
    deployed.args = copy.deepcopy(args)


def with_checkpoint(args: dict, name: str, uri: str) -> dict:
    """`args` with model `name` served from `uri` (same name, same position)."""
    out = copy.deepcopy(args)
    names = list(ServeOptions(**args).models())
    if name not in names:
        raise RolloutError(f"model: the app serves no model {name!r} (it serves: {', '.join(names)})")
    out["checkpoints"][names.index(name)] = f"{name}={uri}"
    return out


def with_canary(args: dict, name: str, uri: str | None) -> dict:
    out = copy.deepcopy(args)
    canaries = dict(out.get("canaries") or {})
    if uri is None:
        canaries.pop(name, None)
    else:
        canaries[name] = uri
    out["canaries"] = canaries
    return out


def wait_serving(app: str, deployment: str, uri: str, version: str, timeout_s: float = WAIT_S) -> dict:
    """Wait until `deployment` is healthy and serves `version` from `uri`; its info. Raises RolloutError
    with the replica's reason when the checkpoint did not load, or when nothing happened in time."""
    from ray import serve

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        dep = status.deployments.get(deployment) if status else None
        state = str(getattr(dep, "status", "")).rsplit(".", 1)[-1]
        if state in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
            try:
                info = serve.get_deployment_handle(deployment, app_name=app).info.remote().result(timeout_s=10)
            except Exception as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if info["version"] == version and info["checkpoint"] == uri:
                    return info
                if info["requested"] == uri and info["last_error"]:
                    raise RolloutError(f"{deployment}: {info['last_error']}")
                last = f"serving {info['version']} from {info['checkpoint']}"
        elif state in ("UNHEALTHY", "DEPLOY_FAILED"):
            raise RolloutError(f"{deployment}: {dep.status}: {dep.message[:500]}")
        elif dep is not None:
            last = f"{dep.status}: {dep.message[:300]}"
        time.sleep(0.5)
    raise RolloutError(f"{deployment}: not serving {version} from {uri} after {timeout_s:.0f}s (last: {last})")


def swap(deployed: Deployed, name: str, uri: str, version: str) -> dict:
    """Serve `uri` as model `name` (in place); the old args come back if it does not load."""
    if name in (deployed.args.get("canaries") or {}):
        raise RolloutError(f"model: a canary of {name} is running; end it first (promote --finish or --rollback)")
    before = copy.deepcopy(deployed.args)
    return _or_restore(deployed, before, with_checkpoint(before, name, uri), f"model-{name}", uri, version)


def _or_restore(deployed: Deployed, before: dict, after: dict, deployment: str, uri: str, version: str) -> dict:
    """Deploy `after` and wait for `deployment` to serve `version`; on any failure deploy `before` again."""
    try:
        apply(deployed, after)
        return wait_serving(deployed.app, deployment, uri, version)
    except Exception as err:
        try:
            apply(deployed, before)
        except Exception as again:
            raise RolloutError(f"{err}; and restoring the previous args failed: {again}") from None
        raise err if isinstance(err, RolloutError) else RolloutError(f"{type(err).__name__}: {err}") from None


def start_canary(deployed: Deployed, name: str, uri: str, version: str, percent: float,
                 max_error_rate: float, min_requests: int, timeout_s: float = 10.0) -> dict:
    """Serve `uri` beside model `name` in its own deployment, then send it `percent` of the requests."""
    max_error_rate, min_requests = canary.check_thresholds(max_error_rate, min_requests)  # before anything changes
    if name in (deployed.args.get("canaries") or {}) or canary.read(deployed.app, name):
        raise RolloutError(f"model: a canary of {name} exists already; end it first (promote --finish or --rollback)")
    with_checkpoint(deployed.args, name, uri)  # checks the name
    before = copy.deepcopy(deployed.args)  # on failure the candidate, which got no traffic, goes away again
    info = _or_restore(deployed, before, with_canary(before, name, uri), canary.deployment_name(name), uri, version)
    record = {"checkpoint": uri, "version": version, "percent": float(percent), "max_error_rate": float(max_error_rate),
              "min_requests": int(min_requests), "timeout_s": float(timeout_s),
              "state": "running", "reason": "", "started_at": time.time()}
    canary.write(deployed.app, name, record)
    return {**record, "card": info.get("card")}


def end_canary(deployed: Deployed, name: str, finish: bool) -> dict:
    """--finish: the candidate becomes model `name` (the current deployment swaps to it first, then the candidate's
    deployment stops getting traffic and is removed). --rollback: the candidate stops getting traffic and is
    removed. Either way no request is lost: the current version answers throughout."""
    record = canary.read(deployed.app, name)
    uri = (deployed.args.get("canaries") or {}).get(name)
    if uri is None and record is None:
        raise RolloutError(f"model: no canary of {name} to end")
    if finish:
        if record is None or record.get("state") != "running":
            why = (record or {}).get("reason") or "it gets no traffic"
            raise RolloutError(f"model: the canary of {name} can't be finished: {why}; roll it back (--rollback)")
        apply(deployed, with_checkpoint(deployed.args, name, uri))
        wait_serving(deployed.app, f"model-{name}", uri, record["version"])
    canary.clear(deployed.app, name)
    time.sleep(DRAIN_S)
    apply(deployed, with_canary(deployed.args, name, None))
    return record or {}
