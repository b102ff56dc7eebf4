"""BatchNorm statistics across DDP workers. Each worker's BatchNorm layers track the running
mean and variance of its own shard only (DDP is told not to broadcast buffers on every
forward: that is one more broadcast in each of D's forward passes per step, and would make
every worker's statistics rank 0's alone). Before anything reads them (a checkpoint, a
sample grid, an evaluation), they are averaged over the workers once, as timm's
``distribute_bn(reduce=True)`` does, so what is saved describes all the data."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def running_stat_buffers(*modules: nn.Module | None) -> list[torch.Tensor]:
    """The running mean and variance of every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``modules``, in a
    fixed order (the same on every worker)."""
    found = []
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats:
                found += [layer.running_mean, layer.running_var]
    return found


def average_batchnorm_stats(*modules: nn.Module | None) -> None:
    """Replace each worker's running statistics with their mean over the process group (a collective:
    every worker must call it at the same point). A no-op outside a group of two or more."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    buffers = running_stat_buffers(*modules)
    if not buffers:
        return
    flat = torch.cat([b.detach().float().flatten() for b in buffers])  # one all-reduce, not one per layer
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
