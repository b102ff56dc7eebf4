"""A VAE's sampling prior is refit to the served model's own encodings before each checkpoint
(VAE.refit_prior, ModelFamily.fit_to_data): on one worker, across workers (a real gloo group), and
through the training engine's in-memory shard."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aigc_ray.models.vae import VAE

# two classes with two clusters of encodings each (class, cluster, d)
CENTRES = torch.tensor([[[-6.0, 0.0], [6.0, 0.0]], [[0.0, -6.0], [0.0, 6.0]]])


def _encodings(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 2) posterior means around CENTRES, their (N,) classes and (N,) clusters."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    cluster = torch.randint(0, 2, (n,), generator=gen)
    return CENTRES[labels, cluster] + 0.3 * torch.randn(n, 2, generator=gen), labels, cluster


def _model_encoding(mu: torch.Tensor) -> VAE:
    """A conditional mixture VAE (2 components per class) whose encoder returns mu[i] for the image
    whose first pixel is i, its online estimate fitted to the clusters shifted by +3 (a stale prior)."""
    model = VAE(8, 1, 2, 8, mixture_components=2, num_classes=2)
    model.encode = lambda images: (mu[((images[:, 0, 0, 0] + 1) * 127.5).round().long()],
                                   torch.full((len(images), 2), -8.0))
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        labels, cluster = torch.randint(0, 2, (64,), generator=gen), torch.randint(0, 2, (64,), generator=gen)
        model._track_mixture(CENTRES[labels, cluster] + 3.0, torch.full((64, 2), -8.0), labels)
    return model


def _images(index: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 8, 8) images whose first pixel carries the row's index (< 256)."""
    images = torch.zeros(len(index), 1, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = index.to(torch.uint8)
    return images


def _batches(index: torch.Tensor, labels: torch.Tensor):
    return lambda: zip(_images(index).split(64), labels[index].split(64))


def test_refit_moves_a_stale_mixture_onto_the_models_own_encodings_per_class():
    mu, labels, cluster = _encodings(200)
    model = _model_encoding(mu)
    stale = (model.mix_sum / model.mix_count[:, None]).view(2, 2, 2)
    assert torch.cdist(CENTRES.view(4, 2), stale.view(4, 2)).min(1).values.min() > 2  # off by the shift
    model.refit_prior(_batches(torch.arange(200), labels))
    means = (model.mix_sum / model.mix_count[:, None]).view(2, 2, 2)  # (class, component, d)
    for c in range(2):
        assert torch.cdist(CENTRES[c], means[c]).min(1).values.max() < 0.2, f"class {c}: {means[c]}"
    # the counts are the images each component holds (all 200, each class's its own 100)
    assert torch.allclose(model.mix_count.view(2, 2).sum(1), torch.tensor([100.0, 100.0]))
    truth = torch.stack([torch.stack([mu[(labels == c) & (cluster == j)].mean(0) for j in range(2)]) for c in range(2)])
    assert torch.allclose(torch.sort(means, 1).values, torch.sort(truth, 1).values, atol=1e-4)
    # each component's covariance is its points' spread (0.3 per axis) plus the posterior variance
    spread = torch.linalg.matrix_norm(model.mix_scale, ord=2)
    assert bool(((spread > 0.2) & (spread < 0.45)).all()), spread
    # samples of class c land on class c's clusters; a second refit changes nothing (no randomness)
    asked = torch.arange(1000) % 2
    nearest = torch.cdist(model._mixture_latents(torch.randn(1000, 2), asked), CENTRES.view(4, 2)).argmin(1) // 2
    assert torch.equal(nearest, asked)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.refit_prior(_batches(torch.arange(200), labels))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refit_without_images_keeps_the_online_estimate():
    mu, labels, _ = _encodings(8)
    model = _model_encoding(mu)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.refit_prior(lambda: iter(()))  # a worker whose shard is not held in memory yet
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refit_of_a_fitted_gaussian_prior_is_the_encodings_mean_and_covariance():
    mu, labels, _ = _encodings(200)
    model = VAE(8, 1, 2, 8, fitted_prior=True)
    model.encode = lambda images: (mu[((images[:, 0, 0, 0] + 1) * 127.5).round().long()],
                                   torch.full((len(images), 2), -8.0))
    model.refit_prior(_batches(torch.arange(200), labels))
    centred = mu - mu.mean(0)
    expected = centred.T @ centred / 200 + torch.exp(torch.tensor(-8.0)) * torch.eye(2)
    assert torch.allclose(model.prior_mean, mu.mean(0), atol=1e-5)
    assert torch.allclose(model.prior_cov, expected, atol=1e-4)
    assert torch.allclose(model.prior_scale @ model.prior_scale.T, expected, atol=1e-3)


def _refit_on_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mu, labels, _ = _encodings(200)
        model = _model_encoding(mu)
        model.refit_prior(_batches(torch.arange(200)[rank::world], labels), dist.all_reduce)  # its shard only
        torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_each_with_half_the_images_refit_the_prior_one_worker_would(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_refit_on_worker, args=(2, port, str(tmp_path)), nprocs=2)
    mu, labels, _ = _encodings(200)
    alone = _model_encoding(mu)
    alone.refit_prior(_batches(torch.arange(200), labels))
    assert not torch.allclose(alone.mix_sum, _model_encoding(mu).mix_sum, atol=1)  # it did move
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("mix_count", "mix_sum", "mix_outer", "mix_scale"):
            assert torch.allclose(state[key], alone.state_dict()[key], atol=1e-4), (rank, key)


def test_the_engine_refits_the_served_ema_model_from_the_in_memory_shard(tmp_path):
    """What the training loop does before each checkpoint, on a real engine and shard."""
    from conftest import tiny_config

    from aigc_ray.train.engine import Engine
    from aigc_ray.train.loop import ShardBatches

    cfg = tiny_config(tmp_path, "vae", **{"model.num_classes": 2, "model.options.prior": "mixture",
                                          "model.options.mixture_components": 2, "train.ema_decay": 0.9})
    engine = Engine(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(96) % 2
    streamed = ShardBatches(None, 32, torch.device("cpu"), 64, 0)
    assert list(streamed.in_memory()) == []  # a streamed shard is not read twice
    batches = ShardBatches(None, 32, torch.device("cpu"), 64, 0, preloaded=(images, labels))
    for x, y in batches.epoch(0):
        engine.train_batch(x, y)
    served = engine.served_module()
    assert served is not engine.G
    engine.fit_to_data(batches.in_memory)
    assert torch.allclose(served.mix_count.view(2, 2).sum(1), torch.tensor([48.0, 48.0]))  # every image, once
    with torch.no_grad():
        mu = served.eval().encode(images.float() / 127.5 - 1)[0]
    means = served.mix_sum / served.mix_count.clamp_min(1e-8)[:, None]
    for c in range(2):
        held = served.mix_count.view(2, 2)[c] > 0
        weighted = (means.view(2, 2, -1)[c][held] * served.mix_count.view(2, 2)[c][held, None]).sum(0) / 48
        assert torch.allclose(weighted, mu[labels == c].mean(0), atol=1e-4)  # the class's own encodings
