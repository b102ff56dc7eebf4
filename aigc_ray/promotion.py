"""Quality-gated promotion: does a candidate's quality card beat the served model's, on the same protocol?

Pure functions over quality cards (aigc_ray.eval.quality, format aigc-ray-card/2), no Ray, no
torch, so the rule is easy to test and to read:

- Two cards are comparable only when they were measured the same way: same card format, same
  dataset content (content hash), same sample count N, same number of draws and same seed. Another
  dataset is a hard error (nothing to re-score against); another N, draw count or seed, or a
  candidate card of an older format, can be fixed by re-scoring the candidate on the served card's
  protocol (the CLI does that when the dataset is at hand). A *served* card of an older format
  can't be paired: re-score the served checkpoint first.
- The comparison is paired: with one seed, draw d of both cards used the same latents against the
  same reference, so the per-draw differences cancel what the two draws share. gain_d =
  (current_d - candidate_d) / mean(current) for a lower-is-better metric (candidate - current
  otherwise); the gain is their mean with a 95% Student-t interval.
- The candidate is promoted when the gain is beyond noise (its interval's lower end above 0) *and*
  at least ``min_gain``. A gain within noise is refused, and the reason shows both cards' intervals
  and the gain's.

Text models (the section at the end) follow the same shape on their own card (aigc_ray/text_quality.py):
validation bits/byte paired block by block over the same validation blocks instead of draws. A text
candidate for an image model, or the reverse, is an error naming the modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PROTOCOL_FIELDS = ("content_hash", "num_samples", "draws", "seed")  # what "measured the same way" means
RESCORABLE = ("num_samples", "draws", "seed")  # differences a re-score on the served card's protocol removes
CURRENT_FORMAT = "aigc-ray-card/2"  # aigc_ray.models.checkpoint.CARD_FORMAT (no torch import here)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
INTERFACE_FIELDS = ("image_size", "channels", "num_classes", "latent_dim")  # what clients of NAME rely on


class PromotionError(ValueError):
    """The cards can't be compared (or a checkpoint can't replace the served one); the message says why."""


class ProtocolMismatch(PromotionError):
    """The cards were measured differently; ``differences`` lists (field, current, candidate)."""

    def __init__(self, differences: list[tuple[str, Any, Any]], rescorable: bool):
        self.differences, self.rescorable = differences, rescorable
        what = "; ".join(f"{f}: served {cur!r} vs candidate {cand!r}" for f, cur, cand in differences)
        old = [cur for f, cur, _ in differences if f == "format" and cur != CURRENT_FORMAT]
        hint = ("re-score the candidate with `aigc-ray eval --checkpoint P --num-samples N --draws D --seed S` on the "
                "served card's protocol" if rescorable else
                f"the served card is of the old protocol {old[0]!r}: re-score the served checkpoint with `aigc-ray eval` "
                "and reload it (or pass --served CHECKPOINT)" if old else
                "a card measured on another dataset can't be compared")
        super().__init__(f"quality cards measured on different protocols ({what}); {hint}")


@dataclass(frozen=True)
class Verdict:
    promote: bool
    metric: str
    current: float
    candidate: float
    gain: float
    """Relative improvement of the candidate (positive = better), e.g. 0.12 = 12% better."""
    min_gain: float
    reason: str
    gain_interval: tuple[float, float] = (math.nan, math.nan)
    """95% interval of the gain, paired over the draws."""


def protocol_of(card: dict[str, Any]) -> dict[str, Any]:
    p = card.get("protocol") or {}
    return {"format": card.get("format"), "dataset": p.get("dataset"), **{f: p.get(f) for f in PROTOCOL_FIELDS}}


def protocol_differences(current: dict[str, Any], candidate: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = protocol_of(current), protocol_of(candidate)
    return [(f, a[f], b[f]) for f in ("format", *PROTOCOL_FIELDS) if a[f] != b[f]]


def check_comparable(current: dict[str, Any], candidate: dict[str, Any]) -> None:
    """Raise ProtocolMismatch naming each difference (rescorable when only N / seed differ)."""
    diffs = protocol_differences(current, candidate)
    if diffs:
        dataset = [("dataset", protocol_of(current)["dataset"], protocol_of(candidate)["dataset"])]
        named = dataset + diffs if any(f == "content_hash" for f, _, _ in diffs) else diffs
        # a candidate card of an older format is re-scored like another N or seed; a served one can't be
        rescorable = all(f in RESCORABLE or (f == "format" and cur == CURRENT_FORMAT) for f, cur, _ in diffs)
        raise ProtocolMismatch(named, rescorable=rescorable)


def interface_differences(current: dict[str, Any], candidate: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """What a client of the served name would notice changing (sizes, classes): (field, current, candidate)."""
    return [(f, current.get(f), candidate.get(f)) for f in INTERFACE_FIELDS if current.get(f) != candidate.get(f)]


def relative_gain(current: float, candidate: float, lower_is_better: bool) -> float:
    better_by = (current - candidate) if lower_is_better else (candidate - current)
    if abs(current) < 1e-12:
        return math.inf if better_by > 0 else (0.0 if better_by == 0 else -math.inf)
    return better_by / abs(current)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%), from a table."""
    known = max(k for k in T_975 if k <= df) if df >= 1 else 1
    return T_975[known]


def _interval(card: dict[str, Any], metric: str) -> str:
    pair = (card.get("intervals") or {}).get(metric)
    return f" [{pair[0]:.4g}, {pair[1]:.4g}]" if pair else ""


def compare_cards(current: dict[str, Any], candidate: dict[str, Any], metric: str = "fid",
                  min_gain: float = 0.05) -> Verdict:
    """The promotion decision for `candidate` against the served `current` card (same protocol required):
    a paired comparison over the cards' draws (see the module docstring)."""
    if not min_gain >= 0:
        raise PromotionError(f"min_gain: must be >= 0, got {min_gain}")
    check_comparable(current, candidate)
    values, draws = [], []
    for who, card in (("served", current), ("candidate", candidate)):
        value = (card.get("metrics") or {}).get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            have = ", ".join(sorted(card.get("metrics") or {})) or "none"
            raise PromotionError(f"metric: the {who} card has no {metric!r} (it has: {have})")
        per_draw = (card.get("draws") or {}).get(metric)
        if not isinstance(per_draw, list) or len(per_draw) < 2:
            raise PromotionError(f"metric: the {who} card has no per-draw {metric!r} values to pair; "
                                 "re-score it with `aigc-ray eval`")
        values.append(float(value))
        draws.append([float(v) for v in per_draw])
    lower = metric in (current.get("lower_is_better") or ("fid", "kid"))
    cur, cand = values
    scale = abs(cur) if abs(cur) > 1e-12 else 1.0
    gains = [((c - k) if lower else (k - c)) / scale for c, k in zip(*draws)]
    gain = sum(gains) / len(gains)
    sd = math.sqrt(sum((g - gain) ** 2 for g in gains) / (len(gains) - 1))
    half = t_quantile(len(gains) - 1) * sd / math.sqrt(len(gains))
    lo, hi = gain - half, gain + half
    beyond_noise = lo > 0
    promote = beyond_noise and gain >= min_gain
    direction = "lower" if lower else "higher"
    verdict = ("meets the required" if promote else "below the required" if beyond_noise else
               "worse beyond noise (its interval is entirely below 0), whatever" if hi < 0 else
               "within noise (its interval reaches 0), whatever")
    reason = (f"{metric} {cand:.4g}{_interval(candidate, metric)} vs served {cur:.4g}{_interval(current, metric)} "
              f"({direction} is better): {'better' if gain > 0 else 'not better'} by {gain:+.1%} "
              f"[{lo:+.1%}, {hi:+.1%}] paired over {len(gains)} draws on the same seeds; {verdict} {min_gain:.1%}")
    return Verdict(promote, metric, cur, cand, gain, min_gain, reason, (lo, hi))


def side_by_side(current: dict[str, Any], candidate: dict[str, Any]) -> str:
    """Both cards as one table: metric | served | candidate | floor | change (relative, + = better)."""
    lower = set(current.get("lower_is_better") or ("fid", "kid"))
    names = [m for m in (current.get("metrics") or {}) if m in (candidate.get("metrics") or {}) and m != "kid_std"]
    rows = [("metric", "served", "candidate", "floor", "change"),
            ("", str(current.get("model_version", "?")), str(candidate.get("model_version", "?")), "", "")]
    for m in names:
        cur, cand = current["metrics"][m], candidate["metrics"][m]
        floor = (current.get("floor") or {}).get(m)
        change = relative_gain(cur, cand, m in lower)
        rows.append((m + (" (lower is better)" if m in lower else ""), f"{cur:.4g}{_interval(current, m)}",
                     f"{cand:.4g}{_interval(candidate, m)}",
                     "-" if floor is None else f"{floor:.4g}", f"{change:+.1%}" if math.isfinite(change) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(2, "-" * len(lines[0]))
    a, b = protocol_of(current), protocol_of(candidate)
    for who, p in (("served", a), ("candidate", b)):
        lines.append(f"{who}: {p['draws'] or 1} draws of {p['num_samples']} samples of {p['dataset']} "
                     f"[{str(p['content_hash'])[:12]}], seed {p['seed']}")
    return "\n".join(lines)


# ---- where the cards come from (checkpoints, a sweep's output, a running server); no Ray ---------------


def sweep_candidate(sweep_dir: str) -> str:
    """The checkpoint `aigc-ray tune --out DIR` exported as its best (DIR/summary.json, else DIR/best)."""
    import json
    from pathlib import Path

    summary = Path(sweep_dir) / "summary.json"
    if summary.is_file():
        exported = json.loads(summary.read_text()).get("exported")
        if exported:
            return str(exported)
    if (Path(sweep_dir) / "best" / "config.json").is_file():
        return str(Path(sweep_dir) / "best")
    raise PromotionError(f"sweep: {sweep_dir} has no exported best checkpoint (no summary.json 'exported', no best/)")


def checkpoint_card(checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, interface) of a checkpoint; interface = the INTERFACE_FIELDS of its model config."""
    from aigc_ray import storage
    from aigc_ray.models.checkpoint import read_card, read_meta
    from aigc_ray.models.text_checkpoint import is_text_checkpoint

    local = storage.localize(checkpoint)
    if is_text_checkpoint(local):  # a language model's card: validation bits/byte per block (text section below)
        return text_checkpoint_card(local, checkpoint)
    model = read_meta(local)["model"]
    card = read_card(local)
    if card is None:
        raise PromotionError(f"checkpoint: {checkpoint} has no quality card (card.json); "
                             f"run `aigc-ray eval --checkpoint {checkpoint}` first")
    return card, {"modality": "image", **{f: model.get(f) for f in INTERFACE_FIELDS}}


def served_card(url: str, name: str, timeout_s: float = 10.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, interface) of the model `name` a running server reports at GET {url}/v1/models."""
    import json
    import os
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models")
    if os.environ.get("AIGC_API_TOKEN"):  # a server with a bearer token (as `aigc-ray serve` reads it)
        request.add_header("Authorization", f"Bearer {os.environ['AIGC_API_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            models = json.loads(response.read())["models"]
    except (OSError, urllib.error.URLError, ValueError, KeyError) as err:
        raise PromotionError(f"url: can't read {url.rstrip('/')}/v1/models within {timeout_s:g}s ({err})") from None
    info = next((m for m in models if m.get("name") == name), None)
    if info is None:
        raise PromotionError(f"model: {url} serves no model {name!r} (it serves: "
                             f"{', '.join(m.get('name', '?') for m in models) or 'none'})")
    if not info.get("card"):
        raise PromotionError(f"model: {name} ({info.get('version')}) serves without a quality card; "
                             f"run `aigc-ray eval --checkpoint {info.get('checkpoint')}` and reload it")
    return {"model_version": info.get("version"), **info["card"]}, interface_of(info)  # (a text card has none)


def rescore_like(checkpoint: str, reference: dict[str, Any], dataset: str | None = None,
                 data_root: str | None = None) -> dict[str, Any]:
    """The candidate's card re-measured on `reference`'s sample count and seed. The dataset is found
    by content hash (``dataset`` / ``data_root``, as `aigc-ray eval` takes them), never where the
    candidate checkpoint says."""
    from aigc_ray.eval import evaluate_checkpoint

    p = reference["protocol"]
    return evaluate_checkpoint(checkpoint, num_samples=p["num_samples"], seed=p["seed"], write_card=False,
                               draws=p.get("draws"), dataset=dataset, data_root=data_root)["card"]


# ---- text models: validation bits/byte, paired over the same validation blocks ------------------------
# A text card (aigc_ray/text_quality.py's text_card) keeps each validation block's bits/byte; two cards with
# the same protocol (dataset content, block size, block cap, so the same blocks) pair block by block:
# d_b = candidate_b - served_b. Promoted when d's 95% interval lies entirely below 0 (better beyond noise)
# and the relative gain -mean(d) / served mean is at least min_gain.

TEXT_METRIC = "val_bpb"
TEXT_INTERFACE_FIELDS = ("vocab",)  # what a client of a served text model relies on (prompt bytes in, bytes out)


def interface_of(info: dict[str, Any]) -> dict[str, Any]:
    """What clients of a served name rely on, from a model's info (GET /v1/models, the app) or its config."""
    modality = info.get("modality") or "image"
    fields = TEXT_INTERFACE_FIELDS if modality == "text" else INTERFACE_FIELDS
    return {"modality": modality, **{f: info.get(f) for f in fields}}


def check_same_modality(served: dict[str, Any], candidate: dict[str, Any], candidate_path: str, model: str) -> None:
    """A text checkpoint can only replace a text model, an image checkpoint an image model."""
    a, b = served.get("modality") or "image", candidate.get("modality") or "image"
    if a != b:
        raise PromotionError(f"modality: candidate {candidate_path} is a{'n' if b == 'image' else ''} {b} model and "
                             f"{model} serves a{'n' if a == 'image' else ''} {a} model; a {b} checkpoint can only "
                             f"replace a {b} model (serve it under another name)")


def text_protocol_differences(current: dict[str, Any], candidate: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    from aigc_ray.text_quality import PROTOCOL_FIELDS, TEXT_CARD_FORMAT

    a, b = current.get("protocol") or {}, candidate.get("protocol") or {}
    diffs = [(f, a.get(f), b.get(f)) for f in PROTOCOL_FIELDS if a.get(f) != b.get(f)]
    for who, card in (("served", current), ("candidate", candidate)):
        if card.get("format") != TEXT_CARD_FORMAT:
            diffs.append((f"format ({who})", card.get("format"), TEXT_CARD_FORMAT))
    return diffs


def text_card_pairable(card: dict[str, Any]) -> bool:
    """A text card of the current format with its per-block values (what a paired comparison needs)."""
    from aigc_ray.text_quality import TEXT_CARD_FORMAT

    values = (card.get("per_block") or {}).get(TEXT_METRIC)
    return card.get("format") == TEXT_CARD_FORMAT and isinstance(values, list) and len(values) >= 2


def _bpb(card: dict[str, Any]) -> str:
    m = card.get("metrics") or {}
    lo, hi = m.get("val_bpb_lo"), m.get("val_bpb_hi")
    return f"{m.get('val_bpb', math.nan):.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "")


def compare_text_cards(current: dict[str, Any], candidate: dict[str, Any], min_gain: float = 0.05) -> Verdict:
    """The promotion decision for a text `candidate` card against the served `current` one (same blocks)."""
    from aigc_ray.text_quality import paired_block_difference

    if not min_gain >= 0:
        raise PromotionError(f"min_gain: must be >= 0, got {min_gain}")
    for who, card in (("served", current), ("candidate", candidate)):
        if card.get("modality") != "text":
            raise PromotionError(f"modality: the {who} card is not a text model's card")
    diffs = text_protocol_differences(current, candidate)
    if diffs:
        what = "; ".join(f"{f}: served {a!r} vs candidate {b!r}" if not f.startswith("format") else
                         f"{f}: {a!r}, not {b!r} (no per-block values)" for f, a, b in diffs)
        raise PromotionError(f"text cards measured on different validation blocks ({what}); re-score with "
                             "--dataset PREPARED (or --data-root) so both are scored on the served card's blocks")
    blocks = []
    for who, card in (("served", current), ("candidate", candidate)):
        values = (card.get("per_block") or {}).get(TEXT_METRIC)
        if not isinstance(values, list) or len(values) < 2:
            raise PromotionError(f"per_block: the {who} card has no per-block {TEXT_METRIC!r} values to pair")
        blocks.append(values)
    try:
        d = paired_block_difference(*blocks)
    except ValueError as err:
        raise PromotionError(str(err)) from None
    cur, cand = float(current["metrics"][TEXT_METRIC]), float(candidate["metrics"][TEXT_METRIC])
    scale = abs(cur) if abs(cur) > 1e-12 else 1.0
    gain = -d["mean"] / scale
    beyond_noise = d["hi"] < 0
    promote = beyond_noise and gain >= min_gain
    verdict = (f"meets the required {min_gain:.1%}" if promote else f"below the required {min_gain:.1%}"
               if beyond_noise else "worse beyond noise: that interval is entirely above 0" if d["lo"] > 0
               else "within noise: that interval reaches 0")
    reason = (f"val_bpb {_bpb(candidate)} vs served {_bpb(current)} (bits/byte, lower is better): "
              f"{'better' if gain > 0 else 'not better'} by {gain:+.1%}; candidate - served {d['mean']:+.4f} "
              f"[{d['lo']:+.4f}, {d['hi']:+.4f}] bits/byte paired over {d['blocks']} validation blocks; {verdict}")
    return Verdict(promote, TEXT_METRIC, cur, cand, gain, min_gain, reason, (-d["hi"] / scale, -d["lo"] / scale))


def text_side_by_side(current: dict[str, Any], candidate: dict[str, Any]) -> str:
    """Both text cards: bits/byte with intervals, the baselines measured on the served card's blocks."""
    rows = [("", "served", "candidate"),
            ("model", str(current.get("model_version", "?")), str(candidate.get("model_version", "?"))),
            ("val_bpb (lower is better)", _bpb(current), _bpb(candidate))]
    for name in (current.get("baselines") or {}):  # the floor, on each card's own blocks
        rows.append((f"{name} baseline", _bpb({"metrics": current["baselines"][name]}),
                     _bpb({"metrics": (candidate.get("baselines") or {}).get(name) or {}})))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for who, card in (("served", current), ("candidate", candidate)):
        p = card.get("protocol") or {}
        lines.append(f"{who}: {p.get('blocks')} validation blocks of {p.get('block_size')} + 1 bytes "
                     f"[{str(p.get('dataset_hash'))[:12]}], max_blocks {p.get('max_blocks')}")
    return "\n".join(lines)


def text_checkpoint_card(local: str, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card with its model_version, interface) of a text checkpoint already local."""
    from aigc_ray.models.checkpoint import read_card
    from aigc_ray.models.text_checkpoint import read_text_meta, text_model_version

    meta = read_text_meta(local)
    card = read_card(local)
    if card is None:
        raise PromotionError(f"checkpoint: {checkpoint} has no quality card (card.json); a text run writes one "
                             "with each checkpoint")
    return {**card, "model_version": text_model_version(local)}, {"modality": "text", "vocab": meta.get("vocab")}


def find_prepared_text(content_hash: str, dataset: str | None = None, data_root: str | None = None) -> str:
    """The prepared text dataset with this content hash: `dataset` if given (and it matches), else the one
    under data_root/prepared. Never where a checkpoint says it was trained."""
    from pathlib import Path

    from aigc_ray.data.text import TextDataError, read_text_manifest

    candidates = [Path(dataset)] if dataset else sorted(
        (Path(data_root or "~/.cache/aigc-ray").expanduser() / "prepared").glob("text-*"))
    for path in candidates:
        try:
            if read_text_manifest(path).get("content_hash") == content_hash:
                return str(path)
        except (OSError, ValueError, TextDataError):
            continue
    where = f"--dataset {dataset}" if dataset else f"{Path(data_root or '~/.cache/aigc-ray')}/prepared"
    raise PromotionError(f"dataset: no prepared text dataset with content hash {content_hash[:12]} at {where}; "
                         "give --dataset PREPARED_DIR")


def rescore_text_like(local: str, reference: dict[str, Any], dataset: str | None = None,
                      data_root: str | None = None) -> dict[str, Any]:
    """The text checkpoint's card re-measured on `reference`'s validation blocks (not written to it)."""
    import numpy as np

    from aigc_ray.data.text import load_tokens
    from aigc_ray.models.text_checkpoint import load_text_model, text_model_version
    from aigc_ray.text_quality import baselines, model_block_bits, text_card

    p = reference.get("protocol") or {}
    if not p.get("dataset_hash") or not p.get("block_size"):
        raise PromotionError("protocol: the served text card names no dataset_hash / block_size to re-score on")
    prepared = find_prepared_text(p["dataset_hash"], dataset, data_root)
    model, _ = load_text_model(local)
    val, train = np.asarray(load_tokens(prepared, "validation")), np.asarray(load_tokens(prepared, "train"))
    block_size, max_blocks = int(p["block_size"]), int(p.get("max_blocks") or 0)
    try:
        per_block = model_block_bits(model, val, block_size, "cpu", max_blocks)
    except ValueError as err:  # e.g. blocks longer than a learned-position model's block size
        raise PromotionError(f"protocol: can't score {local} on blocks of {block_size} bytes ({err})") from None
    card = text_card(per_block, baselines(train, val, block_size, max_blocks), dataset_hash=p["dataset_hash"],
                     block_size=block_size, max_blocks=max_blocks)
    return {**card, "model_version": text_model_version(local)}
