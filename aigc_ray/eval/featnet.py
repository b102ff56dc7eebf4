"""The domain feature network: what the house FID looks through.

Inception weights can't be fetched offline and see 8x8 digits as noise, so each prepared
dataset gets its own small CNN, trained once on the train split (seconds on a CPU) and
cached beside the shards as ``featnet-<hash>.safetensors`` + ``featnet-<hash>.json``, keyed
by the manifest's content hash (new data -> new network). Its penultimate layer feeds
torchmetrics' FID/KID through their ``feature=`` argument.

Labelled datasets (>= 2 classes) get a classifier (features + logits; accuracy on the test
split recorded). Unlabelled ones (num_classes 0 or 1) get a small autoencoder instead: its
bottleneck gives features, but there are no class predictions, so the inception score and
mode coverage are not available for them.

What the features are (format 2). A classifier's last layer alone is nearly blind to how an image
is drawn (a blurry or speckled 7 and a clean 7 land on the same logit-ready point), so the FID of the
default digits model could not be told from real data's (issue 26). The features are the last
layer's FEATURE_DIM numbers *plus* each conv layer's per-channel spatial mean and the first two
layers' per-channel spatial standard deviation (stroke and texture statistics, what LPIPS-style
metrics read): 64 + (32 + 64 + 128) + (32 + 64) = 384 numbers at width 32. The net is trained
longer (TRAIN_STEPS, cosine learning rate) on images shifted by up to SHIFT pixels, so it keys on
shapes rather than on exact pixel positions.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from aigc_ray import storage
from aigc_ray.data.pipeline import load_split
from aigc_ray.data.prepare import read_manifest

FEATURE_DIM = 64  # the last layer; the features FID sees are wider (FeatureNet.num_features)
MAX_SIDE = 32  # larger images are downsampled first: the net stays seconds-cheap at 128 px
TRAIN_STEPS = 1500  # a dataset's net is trained once and cached beside it
MIN_EPOCHS_STEPS = 200  # a small dataset stops at max(this, 60 passes over it) instead (600 steps for digits)
BATCH = 128
SHIFT = 2  # training-time random translation, in pixels at the net's input side
FORMAT = "aigc-ray-featnet/2"  # 2: multi-layer features, longer training; a /1 cache is retrained


class FeatureNet(nn.Module):
    """uint8 (N, C, S, S) -> features (N, FEATURE_DIM); ``logits`` gives class scores (classifier
    kind) and ``reconstruct`` the decoded image (autoencoder kind). ``num_features`` lets
    torchmetrics skip its dummy forward pass."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.side = min(image_size, MAX_SIDE)
        # conv layers' channels: (S, S) x width, (S/2)^2 x 2 width, (S/4)^2 x 4 width
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1),
                                    nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)])
        self.last = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, FEATURE_DIM))
        self.num_features = FEATURE_DIM + 7 * width + 3 * width  # last layer + 3 layers' means + 2 layers' stds
        if num_classes >= 2:
            self.head = nn.Linear(FEATURE_DIM, num_classes)
        else:  # a linear decoder is enough to make the bottleneck keep what distinguishes images
            self.head = nn.Linear(FEATURE_DIM, channels * self.side * self.side)
        # features are standardised with the train split's statistics (set after training), so
        # FID/KID land on the same scale for every dataset and KID's cubic kernel stays tame
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_std", torch.ones(self.num_features))

    @property
    def kind(self) -> str:
        return "classifier" if self.num_classes >= 2 else "autoencoder"

    def prep(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        return x

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prepped (N, C, s, s) -> (last layer (N, FEATURE_DIM), unstandardised features (N, num_features))."""
        maps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            maps.append(x)
        last = self.last(x)
        stats = [m.mean((2, 3)) for m in maps] + [m.std((2, 3)) for m in maps[:2]]
        return last, torch.cat([last, *stats], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, num_features): what FID, KID and precision/recall see."""
        return self._features(self.trunk(self.prep(images))[1])

    def _features(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.feat_mean) / self.feat_std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind != "classifier":
            raise ValueError("an autoencoder feature net has no class logits")
        return self._logits(self.trunk(self.prep(images))[0])

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.head(F.leaky_relu(last, 0.1))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward() and logits() (None for an autoencoder) from one pass through the trunk: an
        evaluation needs both for every generated image."""
        last, raw = self.trunk(self.prep(images))
        return self._features(raw), self._logits(last) if self.kind == "classifier" else None

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.head(self.trunk(self.prep(images))[0]))
        return out.view(len(images), self.channels, self.side, self.side)


# nets this process trained, by (content hash, seed): the same data prepared again elsewhere (another data
# root, a test's temporary directory) gets the same net, written beside it, without training it again
_trained: dict[tuple[str, int], tuple[dict[str, torch.Tensor], dict]] = {}


def _names(content_hash: str) -> tuple[str, str]:
    stem = f"featnet-{content_hash[:16]}"
    return f"{stem}.safetensors", f"{stem}.json"


def load_or_train(prepared: str, seed: int = 0, quiet: bool = False) -> tuple[FeatureNet, dict]:
    """The dataset's feature net (eval mode, CPU) and its info json; trained and cached on first use."""
    manifest = read_manifest(prepared)
    weights_name, info_name = _names(manifest["content_hash"])
    info_path, weights_path = storage.join(prepared, info_name), storage.join(prepared, weights_name)
    num_classes = manifest["num_classes"] if manifest["num_classes"] >= 2 else 0
    info = storage.read_json(info_path) if storage.exists(weights_path) else None  # torn: trained again
    if isinstance(info, dict) and info.get("format") == FORMAT:  # an older format's net is trained again
        net = FeatureNet(manifest["channels"], manifest["image_size"], num_classes)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, weights_name)
            local.write_bytes(storage.read_bytes(weights_path))
            net.load_state_dict(load_file(str(local)))
        return net.eval(), info
    if num_classes == 0 and not quiet:
        print(f"eval: {manifest['source']} has no class labels (num_classes={manifest['num_classes']}); domain "
              "features come from a small autoencoder trained on it instead of a classifier, and the "
              "inception score and mode coverage are not available", file=sys.stderr)
    key = (manifest["content_hash"], seed)
    if key in _trained:
        net = FeatureNet(manifest["channels"], manifest["image_size"], num_classes)
        net.load_state_dict(_trained[key][0])
        info = dict(_trained[key][1])
    else:
        net, info = _train(prepared, manifest, num_classes, seed)
        _trained[key] = ({k: v.clone() for k, v in net.state_dict().items()}, dict(info))
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(tmp, weights_name)),
                  metadata={"format": FORMAT})
        # weights first, info last: a reader that sees the info finds the weights complete
        storage.write_bytes(weights_path, Path(tmp, weights_name).read_bytes())
    storage.write_json(info_path, info)
    return net.eval(), info


def train_steps(num_train: int) -> int:
    """TRAIN_STEPS, or for a small dataset max(MIN_EPOCHS_STEPS, 60 passes over it)."""
    return min(TRAIN_STEPS, max(MIN_EPOCHS_STEPS, math.ceil(60 * num_train / BATCH)))


def _shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, C, s, s) prepped images moved by up to SHIFT pixels (edges replicated), one offset per batch."""
    padded = F.pad(x, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=gen).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _train(prepared: str, manifest: dict, num_classes: int, seed: int) -> tuple[FeatureNet, dict]:
    # one intra-op thread: this net's small convs gain little from a second one, and beside anything else busy
    # (Ray workers, a test run) two threads spin against each other, measured 13x slower per step on 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_one_thread(prepared, manifest, num_classes, seed)
    finally:
        torch.set_num_threads(threads)


def _train_one_thread(prepared: str, manifest: dict, num_classes: int, seed: int) -> tuple[FeatureNet, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_split(prepared, "train")
    x_test, y_test = load_split(prepared, "test")
    net = FeatureNet(manifest["channels"], manifest["image_size"], num_classes)
    steps = train_steps(len(x_train))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x_train), (min(BATCH, len(x_train)),), generator=gen)
        x = net.prep(x_train[idx])
        if num_classes:
            loss = F.cross_entropy(net._logits(net.trunk(_shifted(x, gen))[0]), y_train[idx])
        else:  # an autoencoder reconstructs what it sees; shifting would only blur its target
            loss = F.mse_loss(torch.tanh(net.head(net.trunk(x)[0])).view_as(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net.trunk(net.prep(b))[1] for b in x_train.split(512)])
        net.feat_mean.copy_(feats.mean(0))
        net.feat_std.copy_(feats.std(0).clamp_min(1e-6))
    info = {"format": FORMAT, "kind": net.kind, "content_hash": manifest["content_hash"],
            "source": manifest["source"], "num_classes": num_classes, "feature_dim": net.num_features,
            "input_side": net.side, "train_steps": steps, "shift_px": SHIFT, "seed": seed}
    with torch.no_grad():
        if num_classes:
            pred = torch.cat([net.logits(b).argmax(1) for b in x_test.split(512)])
            info["test_accuracy"] = round(float((pred == y_test).float().mean()), 4)
        else:
            err = [F.mse_loss(net.reconstruct(b), net.prep(b), reduction="sum") for b in x_test.split(512)]
            info["test_mse"] = round(float(sum(err)) / (len(x_test) * net.channels * net.side**2), 5)
    return net, info
