"""Megatron's region operators for the last dimension, used by the parallel linears.

``gather_last_dim``: forward all-gathers shards along the last dimension; backward keeps this rank's
slice (the incoming gradient is the same on every rank). ``split_last_dim`` is its dual. The gather
goes through torch.distributed (recorded as ``last_path("gather_last_dim")``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels._runtime import record_path


def _gather_last_dim_raw(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    record_path("gather_last_dim", "torch.distributed")
    return torch.cat(parts, dim=-1)


def _split_last_dim_raw(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world:
        raise ValueError(f"aiter_dist: last dimension {x.shape[-1]} is not divisible by the "
                         f"tensor-parallel world size {world}")
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


class GatherLastDimFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim_raw(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim_raw(grad, ctx.group), None


class SplitLastDimFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim_raw(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim_raw(grad, ctx.group), None


def gather_last_dim(x, group=None):
    return GatherLastDimFunc.apply(x, group if group is not None else dist.group.WORLD)


def split_last_dim(x, group=None):
    return SplitLastDimFunc.apply(x, group if group is not None else dist.group.WORLD)
