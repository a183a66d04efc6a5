"""Megatron's region operators: split a replicated tensor into this rank's slice, or gather the
slices back, with the dual in the backward.

``gather(x, dim)``: forward all-gathers the shards along ``dim``; backward keeps this rank's slice
of the gradient, which must be the same on every rank (the computation after the gather is
replicated). ``split(x, dim)`` is its dual. Both run on aiter_dist's all-gather (``algo="auto"``).

Used along the last dim by the parallel linears (``gather_output``, ``input_is_parallel=False``)
and along dim 0 (tokens) by the sequence-parallel model: ``split_first_dim`` enters the
sequence-parallel region from the replicated embedding output, ``gather_first_dim`` leaves it
towards the replicated head. Inside the region ``aiter_dist.all_gather`` (backward: reduce-scatter)
feeds tensor-parallel layers, whose input gradients are partial.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .gather_scatter import all_gather_raw
from .protocol import resolve_group


def _split_raw(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world and dim == 0:
        raise ValueError(f"aiter_dist: {x.shape[0]} tokens are not divisible by the "
                         f"sequence-parallel world size {world}; pad the batch or sequence")
    if x.shape[dim] % world:
        raise ValueError(f"aiter_dist: dimension {dim} of size {x.shape[dim]} is not divisible by "
                         f"the tensor-parallel world size {world}")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _gather_raw(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    return all_gather_raw(x.contiguous(), dim, group)


class GatherFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.args = (group, dim)
        return _gather_raw(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split_raw(grad, *ctx.args), None, None


class SplitFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.args = (group, dim)
        return _split_raw(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_raw(grad, *ctx.args), None, None


def gather_last_dim(x, group=None):
    return GatherFunc.apply(x, resolve_group(group), -1)


def split_last_dim(x, group=None):
    return SplitFunc.apply(x, resolve_group(group), -1)


def split_first_dim(x, group=None):
    """This rank's chunk of dim 0 of a replicated tensor; backward all-gathers the gradient."""
    return SplitFunc.apply(x, resolve_group(group), 0)


def gather_first_dim(x, group=None):
    """All-gather along dim 0 for replicated computation after it; backward keeps this rank's
    slice of the gradient."""
    return GatherFunc.apply(x, resolve_group(group), 0)
