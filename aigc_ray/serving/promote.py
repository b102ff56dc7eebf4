"""`aigc-ray promote` (and `aigc-ray tune --promote`): the quality gate (aigc_ray/promotion.py), then the
rollout into the running app (serving/rollout.py): a swap in place, or a canary, or the end of one.

Exit codes: 0 promoted (or gate passed with gate_only, or canary started / ended); 1 refused by the gate,
nothing changed; 2 can't compare, bad input, or the rollout failed (the app keeps serving what it served).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from aigc_ray import promotion as pr


@dataclass
class PromoteRequest:
    model: str
    """Served model NAME."""
    candidate: str | None = None
    """Candidate checkpoint (path or URI); None with finish / rollback."""
    url: str | None = None
    """Read the served card from a running server's GET /v1/models (else from the app through Ray)."""
    served: str | None = None
    """Read the served card from this checkpoint instead."""
    metric: str | None = None
    """Card metric to judge on; None: fid for an image model, val_bpb (the only one) for a text model."""
    min_gain: float = 0.05
    no_rescore: bool = False
    dataset: str | None = None
    data_root: str | None = None
    gate_only: bool = False
    """Judge only: swap nothing."""
    canary: float | None = None
    """Serve the candidate beside the current version with this percent of the requests."""
    max_error_rate: float = 0.05
    min_requests: int = 20
    canary_timeout_s: float = 10.0
    """A candidate's answer later than this counts as its error (the current version answers instead)."""
    finish: bool = False
    rollback: bool = False
    address: str | None = None
    dashboard: str | None = None
    app: str = "aigc"

    def __post_init__(self) -> None:
        if self.finish and self.rollback:
            raise ValueError("--finish and --rollback: give one")
        ending = self.finish or self.rollback
        if ending and (self.candidate or self.canary is not None):
            raise ValueError("--finish / --rollback end the running canary: give no candidate and no --canary")
        if not ending and not self.candidate:
            raise ValueError("--checkpoint or --sweep: give the candidate")
        if self.canary is not None and not 0 < self.canary < 100:
            raise ValueError(f"--canary: a percent of the requests, 0 < PERCENT < 100, got {self.canary:g}")
        if not 0 <= self.max_error_rate < 1:  # at 1 no 95% lower bound could pass it: nothing would roll back
            raise ValueError(f"--max-error-rate: a share of the requests, 0 <= R < 1, got {self.max_error_rate:g}")
        if not self.canary_timeout_s > 0:
            raise ValueError(f"--canary-timeout: seconds > 0, got {self.canary_timeout_s:g}")
        if self.min_requests < 1:
            raise ValueError(f"--min-requests: at least 1, got {self.min_requests}")
        if self.gate_only and (ending or self.canary is not None):
            raise ValueError("--gate-only: judges a candidate; it can't start or end a canary")


def _served_from_app(req: PromoteRequest) -> tuple[dict, dict]:
    """(card, interface) of what model NAME serves now, asked of the app itself through Ray."""
    from ray import serve

    from aigc_ray.serving import rollout

    rollout.connect(req.address)
    try:
        info = serve.get_deployment_handle(f"model-{req.model}", app_name=req.app).info.remote().result(timeout_s=30)
    except Exception as err:
        raise pr.PromotionError(f"model: can't ask app {req.app!r} for model {req.model!r} "
                                f"({type(err).__name__}: {str(err)[:200]})") from None
    if not info.get("card"):
        raise pr.PromotionError(f"model: {req.model} ({info.get('version')}) serves without a quality card")
    return {"model_version": info.get("version"), **info["card"]}, pr.interface_of(info)  # (a text card has none)


def gate(req: PromoteRequest) -> bool:
    """Print both cards and the verdict; True when the candidate may replace the served model."""
    card, interface = pr.checkpoint_card(req.candidate)
    if req.served:
        current, served_interface = pr.checkpoint_card(req.served)
    elif req.url:
        current, served_interface = pr.served_card(req.url, req.model)
    else:
        current, served_interface = _served_from_app(req)
    pr.check_same_modality(served_interface, interface, req.candidate, req.model)
    if interface.get("modality") == "text":
        return text_gate(req, current, card, served_interface, interface)
    changed = pr.interface_differences(served_interface, interface)
    if changed:
        raise pr.PromotionError(f"candidate {req.candidate} can't replace {req.model}: its clients would see "
                                + "; ".join(f"{f} {a} -> {b}" for f, a, b in changed))
    try:
        pr.check_comparable(current, card)
    except pr.ProtocolMismatch as err:
        if not err.rescorable or req.no_rescore:
            raise
        print(f"re-scoring {req.candidate} on the served card's protocol ({err})", file=sys.stderr)
        card = pr.rescore_like(req.candidate, current, dataset=req.dataset, data_root=req.data_root)
    verdict = pr.compare_cards(current, card, req.metric or "fid", req.min_gain)
    print(pr.side_by_side(current, card))
    print(f"\n{'PROMOTE' if verdict.promote else 'REFUSED'} {req.candidate} for {req.model}: {verdict.reason}",
          flush=True)
    return verdict.promote


def text_gate(req: PromoteRequest, current: dict, card: dict, served_interface: dict, interface: dict) -> bool:
    """The gate for a text model: validation bits/byte paired over the served card's validation blocks
    (aigc_ray/promotion.py's compare_text_cards); a card on other blocks, or without per-block values, is
    re-scored on the served card's blocks from the prepared dataset (--dataset / --data-root)."""
    from aigc_ray import storage

    if req.metric not in (None, pr.TEXT_METRIC):
        raise pr.PromotionError(f"metric: a text model is judged on {pr.TEXT_METRIC} (validation bits/byte), "
                                f"not {req.metric!r}; leave --metric out")
    changed = [(f, a, b) for f, a, b in ((f, served_interface.get(f), interface.get(f)) for f in
                                         pr.TEXT_INTERFACE_FIELDS) if a != b]
    if changed:
        raise pr.PromotionError(f"candidate {req.candidate} can't replace {req.model}: its clients would see "
                                + "; ".join(f"{f} {a} -> {b}" for f, a, b in changed))
    if not pr.text_card_pairable(current):  # no blocks to pair with: only the served checkpoint can be re-scored
        if not req.served or req.no_rescore:
            raise pr.PromotionError(f"per_block: the served card of {req.model} has no per-block val_bpb values "
                                    "(an older text card); pass --served CHECKPOINT (and --dataset PREPARED) to "
                                    "re-score both on the same validation blocks")
        print(f"re-scoring the served {req.served} on its own validation blocks (its card has no per-block "
              "values)", file=sys.stderr)
        with storage.localized(req.served) as local:
            current = pr.rescore_text_like(local, current, req.dataset, req.data_root)
    diffs = pr.text_protocol_differences(current, card)
    if diffs:
        if req.no_rescore:
            return _print_text_verdict(req, current, card)  # raises, naming each difference
        print(f"re-scoring {req.candidate} on the served card's validation blocks ("
              + "; ".join(f"{f}: served {a!r} vs candidate {b!r}" for f, a, b in diffs) + ")", file=sys.stderr)
        with storage.localized(req.candidate) as local:
            card = pr.rescore_text_like(local, current, req.dataset, req.data_root)
    return _print_text_verdict(req, current, card)


def _print_text_verdict(req: PromoteRequest, current: dict, card: dict) -> bool:
    verdict = pr.compare_text_cards(current, card, req.min_gain)
    print(pr.text_side_by_side(current, card))
    print(f"\n{'PROMOTE' if verdict.promote else 'REFUSED'} {req.candidate} for {req.model}: {verdict.reason}",
          flush=True)
    return verdict.promote


def promote(req: PromoteRequest) -> int:
    from aigc_ray import storage
    from aigc_ray.models.checkpoint import model_version
    from aigc_ray.models.text_checkpoint import is_text_checkpoint, text_model_version
    from aigc_ray.serving import rollout

    if req.candidate and not storage.is_uri(req.candidate):  # replicas resolve paths from their own directory
        req.candidate = os.path.abspath(os.path.expanduser(req.candidate))
    if req.candidate and not gate(req):
        print("nothing changed", flush=True)
        return 1
    if req.gate_only:
        return 0
    try:
        rollout.connect(req.address)
        deployed = rollout.find(req.app, req.dashboard)
        if req.finish or req.rollback:
            record = rollout.end_canary(deployed, req.model, finish=req.finish)
            print(f"{'finished' if req.finish else 'rolled back'}: {req.model} serves "
                  f"{record.get('version') if req.finish else 'its current version'}"
                  + ("" if req.finish or not record.get("reason") else f" (was: {record['reason']})"), flush=True)
        else:
            with storage.localized(req.candidate) as local:
                version = text_model_version(local) if is_text_checkpoint(local) else model_version(local)
            if req.canary is not None:
                rollout.start_canary(deployed, req.model, req.candidate, version, req.canary, req.max_error_rate,
                                     req.min_requests, req.canary_timeout_s)
                print(f"canary: {version} serves {req.canary:g}% of {req.model}'s requests beside the current "
                      f"version (automatic rollback when its errors are confidently above {req.max_error_rate:.0%} "
                      f"and above the current version's); end it with `aigc-ray promote --model {req.model} --finish` "
                      "or `--rollback`", flush=True)
            else:
                rollout.swap(deployed, req.model, req.candidate, version)
                print(f"promoted: {req.model} serves {version} from {req.candidate}", flush=True)
    except rollout.RolloutError as err:
        print(f"aigc-ray promote: rollout failed, the app serves what it served before: {err}", file=sys.stderr)
        return 2
    if deployed.source == "declarative":
        print(f"note: app {req.app!r} was deployed with `serve deploy`: put the new checkpoint in your config file "
              "too, or its next `serve deploy` reverts this", flush=True)
    return 0
