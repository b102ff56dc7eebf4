"""Canaries: a candidate for model NAME served beside its current version, with a share of the traffic.

The candidate runs in a deployment of its own, `model-NAME-canary` (app.build_app makes one per entry of
ServeOptions.canaries), so a candidate that crashes or fails to load never takes the current version down.
The ingress picks the version per request, so the normal path is unchanged (the first model answers in the
ingress replica, the others one hop away).
The pick is a credit counter, not a coin: every ingress replica sends exactly `percent` of its requests to the
candidate (to within one request), so a short run already shows the configured share.

State, in Ray's GCS key-value store like the last-known-good records (namespace aigc_serve_canary, key
"<app>/<NAME>"), written by `aigc-ray promote --canary` / `--finish` / `--rollback` (serving/rollout.py):

    {"checkpoint": URI, "version": candidate model version, "percent": 10.0, "max_error_rate": 0.05,
     "min_requests": 20, "timeout_s": 10.0, "state": "running" | "rolled_back", "reason": "..."}

Every ingress replica re-reads it at most every REFRESH_S, so a restarted or added ingress continues the canary.
A request the candidate fails (5xx: it is unavailable or overloaded, an internal error, or no answer within
`timeout_s`, e.g. while its replica restarts) is counted against the candidate and served again by the current
version, so clients do not see the candidate's
failures. When the candidate's error rate passes `max_error_rate` after at least `min_requests` requests, the
ingress rolls the canary back by itself: all traffic returns to the current version and the record says
"rolled_back" with the reason, on every ingress replica (`aigc-ray promote --rollback` then removes the
candidate's deployment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aigc_ray.serving import lkg

NAMESPACE = "aigc_serve_canary"
REFRESH_S = 0.5
logger = logging.getLogger("ray.serve")


def deployment_name(model: str) -> str:
    """The Serve deployment that runs model NAME's candidate."""
    return f"model-{model}-canary"


def key(app: str, model: str) -> str:
    return f"{app}/{model}"


def read(app: str, model: str) -> dict | None:
    return lkg.recall(key(app, model), NAMESPACE)


def write(app: str, model: str, record: dict) -> None:
    lkg.remember(key(app, model), record, NAMESPACE)


def clear(app: str, model: str) -> None:
    lkg.forget(key(app, model), NAMESPACE)


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0


class CanaryRouter:
    """Per ingress replica: which version serves the next request of each model, and what each version did."""

    def __init__(self, app: str, names: list[str]):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.app, self.names = app, list(names)
        self.records: dict[str, dict] = {}
        self.rolled_back: dict[tuple[str, str], dict] = {}  # (model, candidate version) -> the record we wrote
        self.handles: dict[str, object] = {}
        self.credit: dict[str, float] = {}
        self.tallies: dict[tuple[str, str, str], Tally] = {}  # (model, role, version)
        self.current_version: dict[str, str] = {}
        self._read_at = -1e9
        tags = ("model", "model_version", "role")
        self.requests = Counter("aigc_requests", description="Requests answered, per model version and role "
                                "(current / canary).", tag_keys=tags)
        self.errors = Counter("aigc_request_errors", description="Requests a model version failed (5xx; a failed "
                              "canary request is then served by the current version).", tag_keys=tags)
        self.latency_ms = Histogram("aigc_version_latency_ms", description="Ingress-side latency per model version "
                                    "(ms).", boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
                                    tag_keys=tags)
        self.share = Gauge("aigc_canary_percent", description="Share of a model's requests sent to its candidate "
                           "(0 when no canary runs or it was rolled back).", tag_keys=("model", "model_version"))
        self.rollbacks = Counter("aigc_canary_rollbacks", description="Canaries rolled back automatically (error "
                                 "rate over the threshold).", tag_keys=("model", "model_version"))

    async def refresh(self) -> None:
        """Re-read the canary records when they are older than REFRESH_S (one reader at a time)."""
        now = time.monotonic()
        if now - self._read_at < REFRESH_S:
            return
        self._read_at = now
        try:
            fresh = await asyncio.to_thread(lambda: {n: read(self.app, n) for n in self.names})
        except Exception as err:  # the GCS is briefly unreachable: keep routing as before
            logger.warning("canary state not refreshed: %s: %s", type(err).__name__, err)
            return
        for name, record in fresh.items():
            if record is None or record.get("state") != "running":
                self.handles = {k: h for k, h in self.handles.items() if k[0] != name}
            if record is None:
                self.records.pop(name, None)
                continue
            mine = self.rolled_back.get((name, record.get("version", "")))
            self.records[name] = mine if mine and record.get("state") == "running" else record
            running = self.records[name].get("state") == "running"
            self.share.set(float(record.get("percent", 0)) if running else 0.0,
                           tags={"model": name, "model_version": record.get("version", "")})

    def pick(self, model: str):
        """("current", None) or ("canary", handle of the candidate's deployment) for the next request."""
        record = self.records.get(model)
        if not record or record.get("state") != "running":
            return "current", None
        credit = self.credit.get(model, 0.0) + float(record["percent"]) / 100.0
        if credit < 1.0 - 1e-9:  # ten additions of 0.1 make 0.999...: still the tenth request's turn
            self.credit[model] = credit
            return "current", None
        self.credit[model] = credit - 1.0
        which = (model, record.get("version", ""))  # a new canary of the model is a new deployment: a new handle
        if which not in self.handles:
            from ray import serve

            self.handles = {k: h for k, h in self.handles.items() if k[0] != model}
            self.handles[which] = serve.get_deployment_handle(deployment_name(model), app_name=self.app)
        return "canary", self.handles[which]

    def timeout_s(self, model: str) -> float:
        return float((self.records.get(model) or {}).get("timeout_s", 10.0))

    def count(self, model: str, role: str, version: str | None, ok: bool, started: float) -> None:
        if role == "current" and version:
            self.current_version[model] = version
        if version is None:  # a failure: the version that would have answered
            record = self.records.get(model) or {}
            version = record.get("version", "") if role == "canary" else self.current_version.get(model, "")
        tags = {"model": model, "model_version": version, "role": role}
        tally = self.tallies.setdefault((model, role, version), Tally())
        tally.requests += 1
        self.requests.inc(tags=tags)
        self.latency_ms.observe((time.perf_counter() - started) * 1e3, tags=tags)
        if not ok:
            tally.errors += 1
            self.errors.inc(tags=tags)
            if role == "canary":
                self._check_error_rate(model, version, tally)

    def _check_error_rate(self, model: str, version: str, tally: Tally) -> None:
        record = self.records.get(model)
        if not record or record.get("state") != "running" or record.get("version") != version:
            return
        rate = tally.errors / tally.requests
        if tally.requests < int(record.get("min_requests", 20)) or rate <= float(record.get("max_error_rate", 0.05)):
            return
        reason = (f"automatic rollback: candidate {version} failed {tally.errors} of {tally.requests} requests "
                  f"({rate:.1%} > max_error_rate {float(record['max_error_rate']):.1%})")
        rolled = {**record, "state": "rolled_back", "reason": reason, "rolled_back_at": time.time()}
        self.records[model] = self.rolled_back[(model, version)] = rolled
        self.share.set(0.0, tags={"model": model, "model_version": version})
        self.rollbacks.inc(tags={"model": model, "model_version": version})
        logger.error("model %s: %s", model, reason)
        asyncio.get_running_loop().run_in_executor(None, write, self.app, model, rolled)  # every ingress follows

    def status(self, model: str) -> dict | None:
        """What /v1/models shows of a model's canary: its record plus this ingress replica's tallies."""
        record = self.records.get(model)
        if record is None:
            return None
        tally = self.tallies.get((model, "canary", record.get("version", "")), Tally())
        current = self.tallies.get((model, "current", self.current_version.get(model, "")), Tally())
        return {**record, "requests": tally.requests, "errors": tally.errors,
                "current_requests": current.requests, "current_errors": current.errors}
