"""BatchNorm statistics are averaged over DDP workers before a checkpoint (two real gloo processes, no Ray)."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aigc_ray.config import ModelConfig
from aigc_ray.models import build_discriminator, build_generator
from aigc_ray.train.batchnorm import average_batchnorm_stats, running_stat_buffers


def _models():
    torch.manual_seed(0)  # the same initial weights on both workers, as DDP makes them
    cfg = ModelConfig(family="dcgan", image_size=8, latent_dim=8, width=8)
    return build_generator(cfg), build_discriminator(cfg)


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        G, D = _models()
        torch.manual_seed(100 + rank)  # each worker sees its own shard: other batches, other statistics
        G(torch.randn(16, 8) * (1 + 3 * rank))
        D(torch.rand(16, 1, 8, 8) * (1 + rank))
        out[f"before{rank}"] = [b.clone() for b in running_stat_buffers(G, D)]
        average_batchnorm_stats(G, None, D)
        out[f"after{rank}"] = [b.clone() for b in running_stat_buffers(G, D)]
    finally:
        dist.destroy_process_group()


def test_batchnorm_running_stats_are_averaged_over_workers():
    G, D = _models()
    assert running_stat_buffers(G, D), "the test needs a model with BatchNorm"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        out = dict(out)
    before0, before1, after0, after1 = out["before0"], out["before1"], out["after0"], out["after1"]
    assert any(not torch.equal(a, b) for a, b in zip(before0, before1))  # the workers' statistics differed
    for a, b, x, y in zip(before0, before1, after0, after1):
        torch.testing.assert_close(x, (a + b) / 2)  # ... and now both hold their mean
        assert torch.equal(x, y)


def test_averaging_is_a_no_op_without_a_process_group():
    G, D = _models()
    G(torch.randn(16, 8))
    before = [b.clone() for b in running_stat_buffers(G, D)]
    average_batchnorm_stats(G, D)
    assert all(torch.equal(a, b) for a, b in zip(before, running_stat_buffers(G, D)))
