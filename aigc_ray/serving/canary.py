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

(rollout.start_canary checks the thresholds before anything changes: `check_thresholds`, a ValueError naming the
field: 0 <= max_error_rate < 1, min_requests a whole number >= 1.)

Every ingress replica re-reads it at most every REFRESH_S, so a restarted or added ingress continues the canary.
A request the candidate fails (5xx: it is unavailable or overloaded, an internal error, or no answer within
`timeout_s`, e.g. while its replica restarts) is counted against the candidate and served again by the current
version, so clients do not see the candidate's failures.

The automatic rollback respects the noise (`verdict`, a pure function of the counts and the record's thresholds).
A few dozen requests say little: 2 failures in 20 is 10%, but its 95% interval is [2.8%, 30.1%]. So, on each of
the candidate's failures, once it has answered at least `min_requests` requests on this ingress replica:

1. the candidate's error rate gets a 95% Wilson score interval (closed form; exact at 0 and n failures, sane for
   small n where the normal approximation is not);
2. it is only a suspect when that interval's LOWER bound is above `max_error_rate`: it fails more than allowed,
   confidently (at max_error_rate 0, any failure makes it a suspect);
3. when the current version has answered at least `min_requests` requests here too, the candidate must also fail
   distinguishably more often than the current version: the 95% interval of the difference (candidate - current,
   Newcombe's hybrid score interval, built from the two Wilson intervals) lies entirely above 0. When it
   includes 0 (the current version fails about as often: a shared dependency down, an overloaded cluster,
   requests that fail everywhere; or there is too little evidence yet), rolling back would not help and would
   blame the candidate for what is not its own alone: the verdict is "inconclusive", the canary keeps running
   (its failed requests are still answered by the current version), the ingress logs a warning once, and
   `status()` says why. Newcombe's interval, not "the two Wilson intervals don't overlap": non-overlap is a much
   stricter test than 95% (it needs a gap of the sum of the intervals' half-widths, the difference's interval
   only their root sum of squares), which would keep a failing candidate for longer. A current version that
   answered fewer than `min_requests` is not compared (no evidence about it must not shield a candidate that
   clearly fails).

Only then the ingress rolls the canary back by itself: all traffic returns to the current version and the record
says "rolled_back" with the reason (the counts, both intervals and the threshold), on every ingress replica
(`aigc-ray promote --rollback` then removes the candidate's deployment). Every verdict (too few requests,
within the threshold, inconclusive, rollback) is in `status()`, which GET /v1/models shows as the model's
"canary": "verdict" ("waiting" | "within" | "inconclusive" | "rollback"), "verdict_reason", and "error_interval"
{"method": "wilson", "level": 0.95, "candidate": [lo, hi], "current": [lo, hi], "difference": [lo, hi] | null}.

Limits: the tallies are per ingress replica (each judges what it routed; the first to decide rolls back for all).
The check runs at every failure of the candidate, so over a long canary the chance that a candidate exactly at the
threshold is rolled back at some point is above the 2.5% of a single one-sided look (a candidate well within it is
rarely affected).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from aigc_ray.serving import lkg

NAMESPACE = "aigc_serve_canary"
REFRESH_S = 0.5
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
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


def check_thresholds(max_error_rate, min_requests) -> tuple[float, int]:
    """The record's rollback thresholds, checked: (max_error_rate, min_requests); a ValueError naming the field.
    max_error_rate is a share of the requests, 0 <= rate < 1 (0: any failure of a candidate that fails
    distinguishably more than the current version rolls it back; at 1 no interval's lower bound could pass it, so
    nothing would ever roll back). min_requests is a whole number >= 1."""
    if isinstance(max_error_rate, bool) or not isinstance(max_error_rate, (int, float)) \
            or not 0 <= max_error_rate < 1:  # NaN fails the comparison too
        raise ValueError(f"max_error_rate: a share of the requests, 0 <= rate < 1 (at 1 a candidate would never "
                         f"roll back), got {max_error_rate!r}")
    if isinstance(min_requests, bool) or not isinstance(min_requests, (int, float)) \
            or not float(min_requests).is_integer() or min_requests < 1:
        raise ValueError(f"min_requests: a whole number of requests, at least 1, got {min_requests!r}")
    return float(max_error_rate), int(min_requests)


def wilson(errors: int, requests: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an error rate seen as `errors` of `requests`."""
    if requests < 1 or not 0 <= errors <= requests:
        raise ValueError(f"wilson: errors must be 0..requests and requests >= 1, got {errors} of {requests}")
    n, p, z2 = requests, errors / requests, z * z
    scale = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / scale
    return (0.0 if errors == 0 else max(0.0, centre - half)), (1.0 if errors == n else min(1.0, centre + half))


def difference(errors: int, requests: int, other_errors: int, other_requests: int,
               z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (95% by default) of the difference of two error rates, this - other,
    from the two Wilson intervals (Newcombe 1998, method 10)."""
    p1, p2 = errors / requests, other_errors / other_requests
    (l1, u1), (l2, u2) = wilson(errors, requests, z), wilson(other_errors, other_requests, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


@dataclass(frozen=True)
class Verdict:
    """What the counts say about a candidate."""

    kind: str
    """"waiting" (fewer than min_requests), "within" (the interval's lower bound is not above max_error_rate),
    "inconclusive" (above it, but not distinguishable from the current version) or "rollback"."""
    reason: str
    interval: tuple[float, float] | None = None
    """95% Wilson interval of the candidate's error rate (None without requests)."""
    current_interval: tuple[float, float] | None = None
    """The same for the current version, when it answered >= min_requests (else None: not compared)."""
    difference: tuple[float, float] | None = None
    """95% Newcombe interval of candidate - current error rate, when compared."""

    @property
    def rollback(self) -> bool:
        return self.kind == "rollback"


def _rate(errors: int, requests: int, interval: tuple[float, float]) -> str:
    return f"{errors / requests:.1%}, 95% Wilson [{interval[0]:.1%}, {interval[1]:.1%}]"


def verdict(errors: int, requests: int, max_error_rate, min_requests, current_errors: int = 0,
            current_requests: int = 0, version: str = "", current_version: str = "") -> Verdict:
    """The rollback decision (module docstring) for a candidate that failed `errors` of `requests` while the
    current version failed `current_errors` of `current_requests`; max_error_rate and min_requests are the
    record's (checked: a ValueError naming the field)."""
    max_error_rate, min_requests = check_thresholds(max_error_rate, min_requests)
    for field, k, n in (("errors", errors, requests), ("current_errors", current_errors, current_requests)):
        if n < 0 or not 0 <= k <= max(n, 0):
            raise ValueError(f"{field}: 0..requests, got {k} of {n}")
    who = f"candidate {version}".rstrip()
    if requests < min_requests:
        return Verdict("waiting", f"{who} answered {requests} of the min_requests {min_requests} requests "
                                  f"({errors} failed): too few to judge",
                       wilson(errors, requests) if requests else None)
    interval = wilson(errors, requests)
    seen = f"{who} failed {errors} of {requests} requests ({_rate(errors, requests, interval)}"
    if interval[0] <= max_error_rate:
        return Verdict("within", f"{seen}): not confidently above max_error_rate {max_error_rate:.1%} "
                                 "(the interval's lower bound is not above it)", interval)
    seen += f" > max_error_rate {max_error_rate:.1%})"
    cur = f"the current version {current_version}".rstrip()
    if current_requests < min_requests:
        return Verdict("rollback", f"automatic rollback: {seen}; {cur} answered {current_requests} requests here, "
                                   f"fewer than min_requests {min_requests}: not compared", interval)
    current_interval = wilson(current_errors, current_requests)
    diff = difference(errors, requests, current_errors, current_requests)
    compared = (f"{cur} failed {current_errors} of {current_requests} "
                f"({_rate(current_errors, current_requests, current_interval)}); candidate - current "
                f"{(errors / requests - current_errors / current_requests) * 100:+.1f} points "
                f"(95% Newcombe [{diff[0] * 100:+.1f}, {diff[1] * 100:+.1f}]")
    if diff[0] <= 0:
        return Verdict("inconclusive", f"not rolled back: {seen}, but {compared}, includes 0): not distinguishable "
                                       "from the current version's error rate, so not the candidate's alone",
                       interval, current_interval, diff)
    return Verdict("rollback", f"automatic rollback: {seen}; {compared} > 0)", interval, current_interval, diff)


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
        self.held: set[tuple[str, str]] = set()  # (model, candidate version) with an inconclusive verdict, logged
        self.unjudged: set[tuple[str, str]] = set()  # ... whose record's thresholds are bad, logged
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
                                 "rate confidently over the threshold and the current version's).",
                                 tag_keys=("model", "model_version"))

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
        found = self._verdict(model, record, tally)
        if found is not None and found.kind == "inconclusive" and (model, version) not in self.held:
            self.held.add((model, version))  # said once; status() says it on every read
            logger.warning("model %s: %s", model, found.reason)
        if found is None or not found.rollback:
            return
        reason = found.reason
        rolled = {**record, "state": "rolled_back", "reason": reason, "rolled_back_at": time.time()}
        self.records[model] = self.rolled_back[(model, version)] = rolled
        self.share.set(0.0, tags={"model": model, "model_version": version})
        self.rollbacks.inc(tags={"model": model, "model_version": version})
        logger.error("model %s: %s", model, reason)
        asyncio.get_running_loop().run_in_executor(None, write, self.app, model, rolled)  # every ingress follows

    def _verdict(self, model: str, record: dict, tally: Tally) -> Verdict | None:
        """The verdict on the candidate's tally against the current version's (None: the record's thresholds are
        bad, which start_canary refuses to write; logged, never raised into a request)."""
        current_version = self.current_version.get(model, "")
        current = self.tallies.get((model, "current", current_version), Tally())
        try:
            return verdict(tally.errors, tally.requests, record.get("max_error_rate", 0.05),
                           record.get("min_requests", 20), current.errors, current.requests,
                           record.get("version", ""), current_version)
        except ValueError as err:
            if (model, record.get("version", "")) not in self.unjudged:
                self.unjudged.add((model, record.get("version", "")))
                logger.error("model %s: canary record not judged: %s", model, err)
            return None

    def status(self, model: str) -> dict | None:
        """What /v1/models shows of a model's canary: its record plus this ingress replica's tallies, with the
        verdict on them (`describe`)."""
        record = self.records.get(model)
        if record is None:
            return None
        tally = self.tallies.get((model, "canary", record.get("version", "")), Tally())
        current_version = self.current_version.get(model, "")
        current = self.tallies.get((model, "current", current_version), Tally())
        return describe(record, tally, current, current_version)


def describe(record: dict, tally: Tally, current: Tally, current_version: str = "") -> dict:
    """A canary's record with the candidate's and the current version's tallies and the verdict on them: its kind,
    its reason and the 95% intervals it read ("error_interval": candidate and current Wilson intervals, the
    Newcombe interval of their difference when they were compared). Never raises: bad thresholds say so."""
    try:
        found = verdict(tally.errors, tally.requests, record.get("max_error_rate", 0.05),
                        record.get("min_requests", 20), current.errors, current.requests,
                        record.get("version", ""), current_version)
    except ValueError as err:
        found, why = None, f"not judged: {err}"
    interval = {"method": "wilson", "level": 0.95,
                "candidate": list(wilson(tally.errors, tally.requests)) if tally.requests else None,
                "current": list(wilson(current.errors, current.requests)) if current.requests else None,
                "difference": list(found.difference) if found and found.difference else None}
    return {**record, "requests": tally.requests, "errors": tally.errors,
            "current_requests": current.requests, "current_errors": current.errors,
            "error_interval": interval, "verdict": found.kind if found else "unjudged",
            "verdict_reason": found.reason if found else why}
