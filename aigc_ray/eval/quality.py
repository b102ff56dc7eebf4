"""Offline generation quality: domain FID/KID, inception score, mode coverage, precision/recall,
each a mean with a 95% interval, beside a floor and a ceiling, written as a quality card into the
checkpoint (format CARD_FORMAT; DESIGN.md "Quality" says why it is built this way).

Protocol (the same for every number in a card), with n = min(num_samples, test split size):
  - reference: the whole *train* split's features (cached per run): the larger real set, so the
    comparison isn't capped by the test split;
  - model:     ``draws`` independent draws of n generated images (draw d: latent seed seed*1000 + d;
               reconstructions of a random n test images for a family that cannot generate), each
               scored against the reference; a metric is the draws' mean with a 95% Student-t
               interval. FID is biased upwards at small n, so each draw has the floor's size n;
  - floor:     n real held-out *test* images against the same reference (the whole test split when
               n is its size; else the mean over ``draws`` random n-subsets): what a perfect
               generator scores at this n. Its interval comes from a bootstrap of the real sets
               (FLOOR_BOOTSTRAP resamples of the test images and of the reference; value +- 1.96 sd),
               since the real sets can't be drawn again;
  - ceiling:   one draw of n images from the same architecture, untrained;
  - ratio:     model / floor, the interval the model's over the floor's value ("times worse than real
               data at this n"). The floor's own interval is the dataset's uncertainty: shared by every
               model scored on it, it cancels when two models are compared, so it isn't folded in;
  - memorisation: each sample's pixel distance to its nearest training image against held-out
               images': a share of near-copies far above the held-out 1% flags the card (a copy of a
               training image scores *below* the floor, so the ratio alone would reward it).
KID is the unbiased estimate with its subset std (Binkowski et al. 2018), per draw.

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
from scipy import stats
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from aigc_ray import storage
from aigc_ray.config import DataConfig, ExperimentConfig
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import MANIFEST, read_manifest
from aigc_ray.eval.featnet import FeatureNet, load_or_train
from aigc_ray.models import build_generator
from aigc_ray.models.checkpoint import CARD_FORMAT, load_generator, model_config, model_version, read_meta, write_card
from aigc_ray.pipeline import GeneratorPipeline

FEATNET_SEED = 0  # fixed, so every evaluation of a dataset looks through the same cached network
PR_NEIGHBOURS = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019 use 3)
LOWER_IS_BETTER = ("fid", "kid")
CONFIDENCE = 0.95
FLOOR_BOOTSTRAP = 20  # resamples of the real sets behind the floor's interval
DRAW_SEED_STRIDE = 1000  # draw d of seed s uses latent seed s * 1000 + d: seeds 0..9 never share a draw
KID_SUBSETS = 10  # per draw; the draws' spread gives the interval, the subsets' std the within-draw one
NEAR_COPY_QUANTILE = 0.01  # "near copy": nearer a training image than all but 1% of held-out images are
NEAR_COPY_FLAG = 0.05  # a card is flagged when more than 5% of samples are near copies (held-out: 1%)
_cache: dict[tuple, Any] = {}  # references, floors, ceilings, splits: reused across evaluations in one process


class _Precomputed(torch.nn.Module):
    """The feature extractor handed to torchmetrics' KID: the features are computed once
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


class Reference:
    """A real image set's features, with what every draw scored against it reuses: their mean and the
    square root of their covariance (FID), their rows loaded into KID (``reset_real_features=False``)
    and their k-NN radii (precision/recall). A draw then costs only its own features."""

    def __init__(self, net: FeatureNet, features: torch.Tensor):
        self.net, self.features = net, features
        self.mean, cov = _moments(features)
        values, vectors = torch.linalg.eigh(cov)
        self.cov_sqrt = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
        self.cov_trace = float(cov.trace())
        self.kid_subset_size = None
        self._kid: KernelInceptionDistance | None = None
        with torch.no_grad():
            self.radii = _kth_radii(features.double())

    def frechet_distance(self, fake_feats: torch.Tensor) -> float:
        """FID = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2), with tr((S_r S_f)^1/2) the sum
        of the square roots of the eigenvalues of the symmetric S_r^1/2 S_f S_r^1/2 (the same value as
        torchmetrics' FID, whose general eigvals of S_r S_f cost ~30x more at 384 features; a test
        compares them)."""
        mean, cov = _moments(fake_feats)
        inner = self.cov_sqrt @ cov @ self.cov_sqrt
        root_trace = float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum())
        return float((self.mean - mean).square().sum()) + self.cov_trace + float(cov.trace()) - 2 * root_trace

    def _kid_for(self, n: int) -> KernelInceptionDistance:
        size = max(2, min(1000, n // 2, len(self.features)))
        if self._kid is None or size != self.kid_subset_size:
            with warnings.catch_warnings():  # "will save all extracted features": a few thousand rows here
                warnings.simplefilter("ignore", UserWarning)
                self._kid = KernelInceptionDistance(feature=_Precomputed(self.net.num_features), subsets=KID_SUBSETS,
                                                    subset_size=size, normalize=False, reset_real_features=False)
            for chunk in self.features.split(512):
                self._kid.update(chunk, real=True)
            self.kid_subset_size = size
        return self._kid

    def score(self, fake_feats: torch.Tensor, fake_logits: torch.Tensor | None, seed: int,
              fake_labels: torch.Tensor | None = None) -> dict[str, float]:
        """All metrics of one set of fake features (N, D) against this reference. ``fake_labels`` (N,):
        the class each image should show (asked of a conditional generator; a real image's own label),
        which adds class_accuracy when the net is a classifier."""
        kid = self._kid_for(len(fake_feats))
        with torch.no_grad():
            kid.reset()  # the fake side only
            for chunk in fake_feats.split(512):
                kid.update(chunk, real=False)
            torch.manual_seed(seed)  # KID draws its subsets from the global generator
            kid_mean, kid_std = kid.compute()
            out = {"fid": self.frechet_distance(fake_feats), "kid": float(kid_mean), "kid_std": float(kid_std)}
            out["precision"], out["recall"] = precision_recall(self.features.double(), fake_feats.double(),
                                                               real_radii=self.radii)
            if fake_logits is not None:
                out.update(classifier_scores(fake_logits.softmax(1).double()))
                if fake_labels is not None:
                    # how often the classifier names the class asked for: the FID cannot tell a clean
                    # square from a square-ish blob drawn in the right proportion, this can
                    out["class_accuracy"] = float((fake_logits.argmax(1) == fake_labels).double().mean())
        return out


def domain_metrics(net: FeatureNet, real: torch.Tensor, fake: torch.Tensor, seed: int = 0, *,
                   real_outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                   fake_labels: torch.Tensor | None = None) -> dict[str, float]:
    """All metrics of one set of ``fake`` images against ``real`` (both uint8 (N, C, S, S)) through
    ``net``: a single draw, no interval (benchmarks screening many settings use it)."""
    real_feats, _ = real_outputs or net_outputs(net, real)
    return Reference(net, real_feats).score(*net_outputs(net, fake), seed, fake_labels)


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), in float64."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def _kth_radii(x: torch.Tensor, k: int = PR_NEIGHBOURS) -> torch.Tensor:
    """(N,) each point's distance to its k-th nearest other point (+1: the 0 distance to itself)."""
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(2048)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): the share of fake samples inside the
    real manifold (the union of balls reaching each real feature's k-th nearest real neighbour),
    and the share of real samples inside the fake manifold."""
    real_radii = _kth_radii(real, k) if real_radii is None else real_radii
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= real_radii[None, :]).any(dim=1).double().mean()
    recall = (d <= _kth_radii(fake, k)[:, None]).any(dim=0).double().mean()
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


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t interval of the mean of independent draws."""
    x = torch.tensor(values, dtype=torch.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * float(x.std()) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def nearest_train_distances(images: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, S, S), (M, C, S, S) -> (N,) pixel-space L2 distance (pixels in [0, 1]) to the nearest
    training image."""
    flat_train = train.flatten(1).float() / 255
    return torch.cat([torch.cdist(b.flatten(1).float() / 255, flat_train).min(1).values for b in images.split(256)])


def memorisation(generated: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor) -> dict[str, Any]:
    """Are samples nearer to training images than new real images are? ``near_copies``: the share of
    samples nearer a training image than all but NEAR_COPY_QUANTILE of the held-out images (which
    score that share by construction); ``flagged`` above NEAR_COPY_FLAG."""
    held = nearest_train_distances(held_out, train)
    drawn = nearest_train_distances(generated, train)
    threshold = torch.quantile(held, NEAR_COPY_QUANTILE)
    share = float((drawn < threshold).double().mean())
    return {"near_copies": round(share, 4), "held_out_near_copies": round(float((held < threshold).double().mean()), 4),
            "threshold": round(float(threshold), 4), "median_nn_distance": round(float(drawn.median()), 4),
            "held_out_median_nn_distance": round(float(held.median()), 4), "flagged": share > NEAR_COPY_FLAG}


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


def draw_seed(seed: int, draw: int) -> int:
    """The latent seed of draw ``draw`` of an evaluation with ``seed``: two cards with the same seed
    drew their models on the same latents, draw by draw (what a paired comparison needs)."""
    return seed * DRAW_SEED_STRIDE + draw


def _sample_labels(pipe: GeneratorPipeline, n: int) -> torch.Tensor | None:
    """(n,) the class asked for per sample of a conditional generator (cycling 0..C-1), else None."""
    return (torch.arange(n) % pipe.num_classes) if pipe.num_classes and pipe.can_generate else None


def _sample(pipe: GeneratorPipeline, n: int, seed: int, held_out: torch.Tensor) -> torch.Tensor:
    if not pipe.can_generate:  # no prior to sample (a plain autoencoder): score reconstructions of held-out images
        return torch.cat([pipe.reconstruct(b) for b in held_out.split(512)])
    z = torch.randn(n, pipe.latent_dim, generator=torch.Generator().manual_seed(seed)).to(pipe.device)
    labels = _sample_labels(pipe, n)
    labels = None if labels is None else labels.to(pipe.device)
    chunks = [pipe.decode(z[i:i + 512], None if labels is None else labels[i:i + 512]) for i in range(0, n, 512)]
    return torch.cat(chunks)


def sample_limit(n_test: int, can_generate: bool) -> int:
    """The most images a draw may have: the floor's size (the test split), half of it for a family that
    scores reconstructions of test images (draws are then random halves, so they differ)."""
    return n_test if can_generate else max(2, n_test // 2)


def _floor(net: FeatureNet, reference: Reference, test: torch.Tensor, test_labels: torch.Tensor, n: int,
           draws: int, seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(value, interval) per metric of n real test images against the reference: see the module docstring."""
    labelled = net.kind == "classifier"
    if n >= len(test):
        subsets = [torch.arange(len(test))]
    else:
        subsets = [torch.randperm(len(test), generator=torch.Generator().manual_seed(draw_seed(seed, d)))[:n]
                   for d in range(draws)]
    test_feats, test_logits = net_outputs(net, test)
    per = [reference.score(test_feats[i], None if test_logits is None else test_logits[i], seed,
                           test_labels[i] if labelled else None) for i in subsets]
    value = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
    gen = torch.Generator().manual_seed(draw_seed(seed, 999))
    replicates = []
    for _ in range(FLOOR_BOOTSTRAP):  # resample both real sets: the test images and the reference
        i = torch.randint(len(test), (n,), generator=gen)
        resampled = Reference(net, reference.features[torch.randint(len(reference.features),
                                                                    (len(reference.features),), generator=gen)])
        replicates.append(resampled.score(test_feats[i], None if test_logits is None else test_logits[i], seed,
                                          test_labels[i] if labelled else None))
    z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))
    interval = {}
    for k, v in value.items():
        sd = float(torch.tensor([r[k] for r in replicates], dtype=torch.float64).std())
        interval[k] = [v - z * sd, v + z * sd]
    return value, interval


def _stored_floor(prepared: str, info: dict, key: tuple, compute) -> tuple[dict, dict]:
    """The floor for (content hash, n, draws, seed), kept beside the prepared data as floor-*.json: it
    depends only on the data, the feature net and those numbers, and its bootstrap is most of an
    evaluation's cost (each training-time evaluation is a fresh process)."""
    content_hash, n, draws, seed = key
    path = storage.join(prepared, f"floor-{content_hash[:16]}-n{n}-d{draws}-s{seed}.json")
    stamp = {"feature_net": info.get("format"), "feature_net_seed": info.get("seed"), "bootstrap": FLOOR_BOOTSTRAP}
    stored = storage.read_json(path)  # None when absent or torn: computed again
    if isinstance(stored, dict) and stored.get("stamp") == stamp:
        return stored["value"], stored["interval"]
    value, interval = compute()
    try:
        storage.write_json(path, {"stamp": stamp, "value": value, "interval": interval})
    except OSError:
        pass  # a read-only dataset: computed again next time
    return value, interval


def score_checkpoint(checkpoint_dir: str, num_samples: int | None = None, seed: int = 0, *,
                     draws: int | None = None, dataset: str | None = None, data_root: str | None = None,
                     own_checkpoint: bool = False, strict: bool = False) -> dict[str, Any]:
    """The quality card of a local checkpoint directory (nothing written). ``num_samples`` / ``draws``:
    per draw / how many (default: the checkpoint's eval config). ``strict``: a ``num_samples`` over what
    the data allows is an error saying how many it can do (else it is capped, with a note).
    ``dataset`` / ``data_root``: see locate_dataset. ``own_checkpoint``: the checkpoint was just written by
    this run (training, a sweep), so the prepared path it records is the run's own."""
    meta = read_meta(checkpoint_dir)
    cfg = ExperimentConfig.from_dict(meta["experiment"])
    requested = num_samples or cfg.eval.num_samples
    draws = draws or cfg.eval.draws
    if not 2 <= draws <= 1000:
        raise ValueError(f"draws: {draws} asked; an interval needs 2..1000 draws")
    if own_checkpoint and not dataset:
        dataset = meta.get("dataset", {}).get("prepared")
    prepared = locate_dataset(meta, dataset, data_root)
    manifest = read_manifest(prepared)
    if min(manifest["counts"].values()) < 4:
        raise ValueError(f"dataset: {prepared} has {manifest['counts']} images per split; the comparison needs "
                         "at least 4 in each (the test split is the floor's held-out data)")
    net, info = load_or_train(prepared, seed=FEATNET_SEED)
    (train, _), (test, test_labels) = _split(prepared, "train"), _split(prepared, "test")
    model, _ = load_generator(checkpoint_dir)
    pipe = GeneratorPipeline(model, meta, model_version(checkpoint_dir))
    limit = sample_limit(len(test), pipe.can_generate)
    notes = []
    if requested > limit:
        why = (f"{manifest['source']}'s test split has {len(test)} images and a draw has the floor's size"
               if pipe.can_generate else f"{pipe.family} scores reconstructions of random halves of the "
               f"{len(test)} test images")
        if strict:
            raise ValueError(f"num_samples: {requested} per draw asked, but {why}: at most {limit} "
                             f"(draws are not limited: pass --draws for more)")
        notes.append(f"num_samples {requested} capped at {limit}: {why}")
    n = min(requested, limit)

    key = ("reference", manifest["content_hash"])
    if key not in _cache:  # the whole train split through the same net in every evaluation of a run
        _cache[key] = Reference(net, net_outputs(net, train)[0])
    reference = _cache[key]
    # a conditional generator's classes are the dataset's (training checks the count): class_accuracy
    # asks how often the feature net names the class asked for; its floor is the net's own accuracy on
    # the held-out images, its ceiling the untrained generator's (chance)
    asked = _sample_labels(pipe, n) if net.kind == "classifier" and pipe.num_classes == net.num_classes else None
    per_draw: list[dict[str, float]] = []
    first = None
    for d in tqdm(range(draws), desc="draws", unit="draw", disable=None, leave=False):  # a bar on a terminal only
        s = draw_seed(seed, d)
        images = _sample(pipe, n, s, _pick(test, n, s))
        first = images if first is None else first
        per_draw.append(reference.score(*net_outputs(net, images), s, asked))
    names = list(per_draw[0])
    values = {k: [p[k] for p in per_draw] for k in names}
    summary = {k: mean_interval(v) for k, v in values.items()}

    key = ("floor", manifest["content_hash"], n, draws if n < len(test) else 1, seed)
    if key not in _cache:
        _cache[key] = _stored_floor(prepared, info, key[1:], lambda: _floor(net, reference, test, test_labels, n,
                                                                             draws, seed))
    floor, floor_interval = _cache[key]
    key = ("ceiling", manifest["content_hash"], n, seed, json.dumps(meta["model"], sort_keys=True))
    if key not in _cache:
        torch.manual_seed(seed)
        untrained = GeneratorPipeline(build_generator(model_config(meta)).eval(), meta, "untrained")
        s = draw_seed(seed, 0)
        _cache[key] = reference.score(*net_outputs(net, _sample(untrained, n, s, _pick(test, n, s))), s, asked)
    ceiling = _cache[key]
    copies = memorisation(first, _pick(test, n, seed), train)
    if copies["flagged"]:
        notes.append(f"memorisation: {copies['near_copies']:.1%} of the samples are nearer a training image than "
                     f"{1 - NEAR_COPY_QUANTILE:.0%} of held-out images are (held-out: {copies['held_out_near_copies']:.1%}); "
                     "copies score under the floor, so this card's ratios overstate its quality")

    # value / floor; none where the floor isn't a positive distance-like number (KID's unbiased
    # estimate can dip below 0 on real data; kid_std is a spread, not a score)
    ratio, ratio_interval = {}, {}
    for k, (mean, lo, hi) in summary.items():
        if floor.get(k, 0) > 0 and k != "kid_std" and not (k == "kid" and floor_interval[k][0] <= 0):
            ratio[k], ratio_interval[k] = mean / floor[k], [lo / floor[k], hi / floor[k]]
    if info["kind"] != "classifier":
        notes.append("dataset has no class labels: features from an autoencoder; no inception score or mode coverage")
    if not pipe.can_generate:
        notes.append(f"{pipe.family} cannot generate: scored on reconstructions of random test images")
    return {
        "format": CARD_FORMAT, "model_version": pipe.version, "family": pipe.family,
        "step": meta["step"], "epoch": meta["epoch"],
        "metrics": {k: m for k, (m, _, _) in summary.items()},
        "intervals": {k: [lo, hi] for k, (_, lo, hi) in summary.items()},
        "draws": values,
        "floor": floor, "floor_intervals": floor_interval, "ceiling": ceiling,
        "ratio": ratio, "ratio_intervals": ratio_interval,
        "memorisation": copies,
        "lower_is_better": list(LOWER_IS_BETTER),
        "protocol": {
            "dataset": manifest["source"], "content_hash": manifest["content_hash"], "prepared": prepared,
            "num_samples": n, "num_samples_requested": requested, "draws": draws, "seed": seed,
            "draw_seeds": f"{draw_seed(seed, 0)}..{draw_seed(seed, draws - 1)}",
            "weights": "ema" if meta.get("ema") else "raw",
            "reference": f"all {len(train)} train-split images",
            "floor": (f"all {len(test)} test-split images" if n >= len(test) else
                      f"mean of {draws} random {n}-image subsets of the {len(test)} test-split images") + " vs the reference",
            "ceiling": "untrained generator, one draw",
            "interval": f"{CONFIDENCE:.0%} Student-t over the {draws} draws",
            "floor_interval": f"{CONFIDENCE:.0%} normal bootstrap: {FLOOR_BOOTSTRAP} resamples of the test images "
                              "and of the reference",
            "ratio_interval": "the draws' interval over the floor's mean (cards on one protocol share the floor, so its "
                              "uncertainty cancels in a comparison; it is floor_intervals)",
            "feature_net": {k: v for k, v in info.items() if k != "format"} | {"format": info.get("format")},
            "kid_subset_size": reference.kid_subset_size, "kid_subsets": KID_SUBSETS, "pr_neighbours": PR_NEIGHBOURS,
            "notes": notes,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def flat_metrics(card: dict[str, Any]) -> dict[str, float]:
    """The card as flat numbers, the shape Ray Train/Tune metrics want: fid (the draws' mean), fid_lo,
    fid_hi (its interval), fid_floor (+ _lo/_hi), fid_ceiling, fid_ratio (+ _lo/_hi), kid, ... (a ratio
    only where its floor is positive). A card of the old protocol has no intervals: no _lo/_hi keys."""
    out: dict[str, float] = {}
    intervals, floor_intervals = card.get("intervals") or {}, card.get("floor_intervals") or {}
    ratio_intervals = card.get("ratio_intervals") or {}
    for name, value in card["metrics"].items():
        out[name] = value
        out[f"{name}_floor"] = card["floor"][name]
        out[f"{name}_ceiling"] = card["ceiling"][name]
        for suffix, pair in (("", intervals.get(name)), ("_floor", floor_intervals.get(name))):
            if pair:
                out[f"{name}{suffix}_lo"], out[f"{name}{suffix}_hi"] = pair
        if card["ratio"].get(name) is not None:
            out[f"{name}_ratio"] = card["ratio"][name]
            if ratio_intervals.get(name):
                out[f"{name}_ratio_lo"], out[f"{name}_ratio_hi"] = ratio_intervals[name]
    out["eval_num_samples"] = card["protocol"]["num_samples"]
    if "draws" in card["protocol"]:
        out["eval_draws"] = card["protocol"]["draws"]
    if card.get("memorisation"):
        out["near_copies"] = card["memorisation"]["near_copies"]
    return out


def evaluate_checkpoint(checkpoint_dir: str, num_samples: int | None = None, seed: int = 0,
                        write_card: bool = True, **where) -> dict[str, Any]:
    """Score a checkpoint (a local path or an s3:// / gs:// URI) and, by default, write its
    card.json (an older-protocol card already there is kept beside it, marked). Returns the flat
    metrics (fid, fid_lo, fid_hi, fid_floor, fid_ratio, ...) plus "card". ``where``: draws / dataset /
    data_root / own_checkpoint / strict, as score_checkpoint takes them."""
    with storage.localized(checkpoint_dir) as local:
        card = score_checkpoint(local, num_samples, seed, **where)
        if write_card:
            write_card_to(checkpoint_dir, local, card)
    return flat_metrics(card) | {"card": card}


def write_card_to(checkpoint_dir: str, local: str, card: dict[str, Any]) -> None:
    if storage.is_uri(checkpoint_dir):
        storage.write_json(storage.join(checkpoint_dir, "card.json"), card)
    write_card(local, card)


def _fmt(value: float, pair: list[float] | None, digits: int = 4) -> str:
    return f"{value:.{digits}g}" + (f" [{pair[0]:.{digits}g}, {pair[1]:.{digits}g}]" if pair else "")


def format_table(card: dict[str, Any]) -> str:
    """metric | value [95% interval] | floor [interval] | ceiling | ratio (value / floor) [interval], one row per metric."""
    intervals, floor_intervals = card.get("intervals") or {}, card.get("floor_intervals") or {}
    ratio_intervals = card.get("ratio_intervals") or {}
    rows = [("metric", "value [95% interval]", "floor [95%]", "ceiling", "ratio [95%]")]
    for name, value in card["metrics"].items():
        ratio = card["ratio"].get(name)
        arrow = " (lower is better)" if name in LOWER_IS_BETTER else ""
        rows.append((name + arrow, _fmt(value, intervals.get(name)), _fmt(card["floor"][name], floor_intervals.get(name)),
                     f"{card['ceiling'][name]:.4g}",
                     "-" if ratio is None else _fmt(ratio, ratio_intervals.get(name), 3)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    p = card["protocol"]
    fn = p["feature_net"]
    quality = f"accuracy {fn['test_accuracy']:.3f}" if "test_accuracy" in fn else f"recon mse {fn.get('test_mse')}"
    lines.insert(1, "-" * len(lines[0]))
    draws = f"{p['draws']} draws of {p['num_samples']}" if "draws" in p else f"{p['num_samples']}"
    lines.append(f"\n{card['model_version']} ({p['weights']} weights), {draws} samples vs {p['reference']} of "
                 f"{p['dataset']} [{p['content_hash'][:12]}], seed {p['seed']}; feature net: {fn['kind']} ({quality})")
    copies = card.get("memorisation")
    if copies:
        lines.append(f"memorisation: {copies['near_copies']:.1%} near copies of training images "
                     f"(held-out images: {copies['held_out_near_copies']:.1%}){' FLAGGED' if copies['flagged'] else ''}")
    if card.get("old_protocol"):
        lines.append(f"note: {card['old_protocol']}")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)
