"""Offline generation quality: domain FID/KID, inception score, mode coverage, precision/recall,
each with a floor and a ceiling, written as a quality card into the checkpoint.

Protocol (the same for every number in a card): N = min(num_samples, train size, test size)
images are compared with the same N real *train* images (the reference, drawn with the seed):
  - model:   N generated images (reconstructions of N test images for a plain autoencoder);
  - floor:   N real held-out *test* images - what a perfect generator would score at this N
             (FID is biased upwards at small N, so the floor is never 0);
  - ceiling: N images from the same architecture, untrained.
So ``fid / fid_floor`` reads as "times worse than real data", whatever the dataset and N.

No Ray here: the CLI, the Train validation task and benchmarks all call evaluate_checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from aigc_ray import storage
from aigc_ray.config import DataConfig, ExperimentConfig
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import MANIFEST, read_manifest
from aigc_ray.eval.featnet import FeatureNet, load_or_train
from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import load_generator, model_config, model_version, read_meta, write_card
from aigc_ray.pipeline import GeneratorPipeline

CARD_FORMAT = "aigc-ray-card/1"
FEATNET_SEED = 0  # fixed, so every evaluation of a dataset looks through the same cached network
PR_NEIGHBOURS = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019 use 3)
LOWER_IS_BETTER = ("fid", "kid")
_cache: dict[tuple, Any] = {}  # floors, ceilings, loaded splits: reused across evaluations in one process


class _Precomputed(torch.nn.Module):
    """The feature extractor handed to torchmetrics' FID and KID: the features are computed once
    per image set (``net_outputs``), and shared by FID, KID, precision/recall and the class scores."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def net_outputs(net: FeatureNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, C, S, S) -> features (N, D) float32 and class logits (N, K) (None for an
    autoencoder net), in chunks of 512 images."""
    with torch.no_grad():
        parts = [net.features_and_logits(b) for b in images.split(512)]
    features = torch.cat([f for f, _ in parts])
    return features, (torch.cat([lg for _, lg in parts]) if parts[0][1] is not None else None)


def domain_metrics(net: FeatureNet, real: torch.Tensor, fake: torch.Tensor, seed: int = 0, *,
                   real_outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                   fake_labels: torch.Tensor | None = None) -> dict[str, float]:
    """All metrics of ``fake`` against ``real`` (both uint8 (N, C, S, S)) through ``net``.
    ``real_outputs``: ``net_outputs(net, real)`` when the caller already has them (the reference
    set is the same for every evaluation of a run). ``fake_labels`` (N,): the class each fake
    image should show (what a conditional generator was asked for; a real image's own label),
    which adds class_accuracy when ``net`` is a classifier."""
    n = min(len(real), len(fake))
    real_feats, _ = real_outputs or net_outputs(net, real)
    fake_feats, fake_logits = net_outputs(net, fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(net.num_features), normalize=False)
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred 64-d rows here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(net.num_features), subsets=50,
                                      subset_size=max(2, min(1000, n // 2)), normalize=False)
    with torch.no_grad():
        for metric in (fid, kid):
            for chunk in real_feats.split(512):
                metric.update(chunk, real=True)
            for chunk in fake_feats.split(512):
                metric.update(chunk, real=False)
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        kid_mean, kid_std = kid.compute()
        out = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
        out["precision"], out["recall"] = precision_recall(real_feats.double(), fake_feats.double())
        if fake_logits is not None:
            out.update(classifier_scores(fake_logits.softmax(1).double()))
            if fake_labels is not None:
                # how often the classifier names the class asked for: the FID cannot tell a clean
                # square from a square-ish blob drawn in the right proportion, this can
                out["class_accuracy"] = float((fake_logits.argmax(1) == fake_labels).double().mean())
    return out


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): the share of fake samples inside the
    real manifold (the union of balls reaching each real feature's k-th nearest real neighbour),
    and the share of real samples inside the fake manifold."""
    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # +1: the 0 distance to itself

    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= radii(real)[None, :]).any(dim=1).double().mean()
    recall = (d <= radii(fake)[:, None]).any(dim=0).double().mean()
    return float(precision), float(recall)


def classifier_scores(probs: torch.Tensor) -> dict[str, float]:
    """From the feature net's class probabilities (N, K) on generated images: the classifier-based
    inception score exp(E KL(p(y|x) || p(y))), in [1, K]; the entropy of the predicted-label
    histogram over log K (1 = classes produced evenly, 0 = one class: mode collapse); and the
    share of classes produced at least a quarter of their fair share (one stray image doesn't count)."""
    n, k = probs.shape
    marginal = probs.mean(0)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    hist = torch.bincount(probs.argmax(1), minlength=k).double() / n
    entropy = -(hist * hist.clamp_min(1e-12).log()).sum() / math.log(k)
    return {"inception_score": float(kl.mean().exp()), "mode_entropy": float(entropy) + 0.0,  # + 0.0: no "-0"
            "class_coverage": float((hist >= 0.25 / k).double().mean())}


def locate_dataset(meta: dict, dataset: str | None = None, data_root: str | None = None) -> str:
    """The prepared dataset the checkpoint was trained on, found by the content hash it records:
    ``dataset`` when given (a directory written by `aigc-ray prepare`, or parquet:DIR), else the
    local prepared cache under ``data_root`` (default: data.data_root's default). A checkpoint
    may come from anyone, so the paths and data settings it carries are never prepared, read
    or written."""
    want = meta.get("dataset", {}).get("content_hash")
    if dataset:
        path = dataset[len("parquet:"):] if dataset.startswith("parquet:") else dataset
        path = path if storage.is_uri(path) else os.path.expanduser(path)
        found = read_manifest(path)["content_hash"]
        if want and found != want:
            raise ValueError(f"dataset: the checkpoint was trained on data with content hash {want[:12]} but "
                             f"{dataset} holds {found[:12]}")
        return path
    root = Path(os.path.expanduser(data_root or DataConfig().data_root), "prepared")
    for manifest in sorted(root.glob(f"*/{MANIFEST}")) if want else []:
        try:
            if json.loads(manifest.read_text()).get("content_hash") == want:
                return str(manifest.parent)
        except (OSError, ValueError):
            continue  # a torn or foreign manifest is not the one we look for
    raise ValueError(f"dataset: no prepared dataset with content hash {str(want)[:12]} under {root}; pass "
                     "--dataset DIR (the directory `aigc-ray prepare` wrote for it) or --data-root")


def _split(prepared: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, S, S) images and int64 (N,) labels."""
    key = ("split", prepared, split)
    if key not in _cache:
        _cache[key] = load_split(prepared, split)
    return _cache[key]


def _pick(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def _sample_labels(pipe: GeneratorPipeline, n: int) -> torch.Tensor | None:
    """(n,) the class asked for per sample of a conditional generator (cycling 0..C-1), else None."""
    return (torch.arange(n) % pipe.num_classes) if pipe.num_classes and pipe.can_generate else None


def _sample(pipe: GeneratorPipeline, n: int, seed: int, held_out: torch.Tensor) -> torch.Tensor:
    if not pipe.can_generate:  # no prior to sample (a plain autoencoder): score reconstructions of held-out images
        return torch.cat([pipe.reconstruct(b) for b in held_out.split(512)])
    z = torch.randn(n, pipe.latent_dim, generator=torch.Generator().manual_seed(seed)).to(pipe.device)
    labels = _sample_labels(pipe, n)
    labels = None if labels is None else labels.to(pipe.device)
    # a progress bar on a terminal (`aigc-ray eval`); none in a Ray task's log (disable=None: not a TTY)
    starts = tqdm(range(0, n, 512), desc="sampling", unit="batch", disable=None, leave=False)
    chunks = [pipe.decode(z[i:i + 512], None if labels is None else labels[i:i + 512]) for i in starts]
    return torch.cat(chunks)


def score_checkpoint(checkpoint_dir: str, num_samples: int | None = None, seed: int = 0, *,
                     dataset: str | None = None, data_root: str | None = None,
                     own_checkpoint: bool = False) -> dict[str, Any]:
    """The quality card of a local checkpoint directory (nothing written). ``dataset`` /
    ``data_root``: see locate_dataset. ``own_checkpoint``: the checkpoint was just written by
    this run (training, a sweep), so the prepared path it records is the run's own."""
    meta = read_meta(checkpoint_dir)
    cfg = ExperimentConfig.from_dict(meta["experiment"])
    requested = num_samples or cfg.eval.num_samples
    if own_checkpoint and not dataset:
        dataset = meta.get("dataset", {}).get("prepared")
    prepared = locate_dataset(meta, dataset, data_root)
    manifest = read_manifest(prepared)
    if min(manifest["counts"].values()) < 2:
        raise ValueError(f"dataset: {prepared} has {manifest['counts']} images per split; the comparison needs "
                         "at least 2 in each (the test split is the floor's held-out data)")
    net, info = load_or_train(prepared, seed=FEATNET_SEED)
    (train, _), (test, test_labels) = _split(prepared, "train"), _split(prepared, "test")
    n = min(requested, len(train), len(test))
    reference, held_out = _pick(train, n, seed), _pick(test, n, seed + 1)

    model, _ = load_generator(checkpoint_dir)
    pipe = GeneratorPipeline(model, meta, model_version(checkpoint_dir))
    key = ("reference", manifest["content_hash"], n, seed)
    if key not in _cache:  # the same images through the same net in every evaluation of a run
        _cache[key] = net_outputs(net, reference)
    real_outputs = _cache[key]
    # a conditional generator's classes are the dataset's (training checks the count): class_accuracy
    # asks how often the feature net names the class asked for; its floor is the net's own accuracy on
    # the held-out images, its ceiling the untrained generator's (chance)
    asked = _sample_labels(pipe, n) if net.kind == "classifier" and pipe.num_classes == net.num_classes else None
    metrics = domain_metrics(net, reference, _sample(pipe, n, seed, held_out), seed, real_outputs=real_outputs,
                             fake_labels=asked)

    key = ("floor", manifest["content_hash"], n, seed)
    if key not in _cache:
        _cache[key] = domain_metrics(net, reference, held_out, seed, real_outputs=real_outputs,
                                     fake_labels=_pick(test_labels, n, seed + 1) if net.kind == "classifier" else None)
    floor = _cache[key]
    key = ("ceiling", manifest["content_hash"], n, seed, json.dumps(meta["model"], sort_keys=True))
    if key not in _cache:
        torch.manual_seed(seed)
        untrained = build_generator(model_config(meta)).eval()
        _cache[key] = domain_metrics(net, reference, _sample(GeneratorPipeline(untrained, meta, "untrained"),
                                                             n, seed, held_out), seed, real_outputs=real_outputs,
                                     fake_labels=asked)
    ceiling = _cache[key]

    # value / floor; none where the floor isn't a positive distance-like number (KID's unbiased
    # estimate can dip below 0 on real data; kid_std is a spread, not a score)
    ratio = {k: (metrics[k] / floor[k] if floor[k] > 0 and k != "kid_std" else None) for k in metrics}
    notes = []
    if n < requested:
        notes.append(f"num_samples {requested} capped at {n}: the smaller of the train and test splits")
    if info["kind"] != "classifier":
        notes.append("dataset has no class labels: features from an autoencoder; no inception score or mode coverage")
    if not pipe.can_generate:
        notes.append(f"{pipe.family} cannot generate: scored on reconstructions of held-out test images")
    return {
        "format": CARD_FORMAT, "model_version": pipe.version, "family": pipe.family,
        "step": meta["step"], "epoch": meta["epoch"],
        "metrics": metrics, "floor": floor, "ceiling": ceiling, "ratio": ratio,
        "lower_is_better": list(LOWER_IS_BETTER),
        "protocol": {
            "dataset": manifest["source"], "content_hash": manifest["content_hash"], "prepared": prepared,
            "num_samples": n, "num_samples_requested": requested, "seed": seed,
            "weights": "ema" if meta.get("ema") else "raw",
            "reference": "train split", "floor": "test split vs train split", "ceiling": "untrained generator",
            "feature_net": {k: v for k, v in info.items() if k != "format"},
            "kid_subset_size": max(2, min(1000, n // 2)), "pr_neighbours": PR_NEIGHBOURS,
            "notes": notes,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def flat_metrics(card: dict[str, Any]) -> dict[str, float]:
    """The card as flat numbers, the shape Ray Train/Tune metrics want: fid, fid_floor,
    fid_ceiling, fid_ratio, kid, ... (a ratio only where its floor is positive)."""
    out: dict[str, float] = {}
    for name, value in card["metrics"].items():
        out[name] = value
        out[f"{name}_floor"] = card["floor"][name]
        out[f"{name}_ceiling"] = card["ceiling"][name]
        if card["ratio"].get(name) is not None:
            out[f"{name}_ratio"] = card["ratio"][name]
    out["eval_num_samples"] = card["protocol"]["num_samples"]
    return out


def evaluate_checkpoint(checkpoint_dir: str, num_samples: int | None = None, seed: int = 0,
                        write_card: bool = True, **where) -> dict[str, Any]:
    """Score a checkpoint (a local path or an s3:// / gs:// URI) and, by default, write its
    card.json. Returns the flat metrics (fid, kid, fid_floor, fid_ratio, ...) plus "card".
    ``where``: dataset / data_root / own_checkpoint, as score_checkpoint takes them."""
    local = storage.localize(checkpoint_dir)
    card = score_checkpoint(local, num_samples, seed, **where)
    if write_card:
        write_card_to(checkpoint_dir, local, card)
    return flat_metrics(card) | {"card": card}


def write_card_to(checkpoint_dir: str, local: str, card: dict[str, Any]) -> None:
    if storage.is_uri(checkpoint_dir):
        storage.write_json(storage.join(checkpoint_dir, "card.json"), card)
    write_card(local, card)


def format_table(card: dict[str, Any]) -> str:
    """metric | value | floor | ceiling | ratio (value / floor), one row per metric."""
    rows = [("metric", "value", "floor", "ceiling", "ratio")]
    for name, value in card["metrics"].items():
        ratio = card["ratio"].get(name)
        arrow = " (lower is better)" if name in LOWER_IS_BETTER else ""
        rows.append((name + arrow, f"{value:.4g}", f"{card['floor'][name]:.4g}", f"{card['ceiling'][name]:.4g}",
                     "-" if ratio is None else f"{ratio:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    p = card["protocol"]
    fn = p["feature_net"]
    quality = f"accuracy {fn['test_accuracy']:.3f}" if "test_accuracy" in fn else f"recon mse {fn.get('test_mse')}"
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"\n{card['model_version']} ({p['weights']} weights), {p['num_samples']} samples vs {p['reference']} of "
                 f"{p['dataset']} [{p['content_hash'][:12]}], seed {p['seed']}; feature net: {fn['kind']} ({quality})")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)
