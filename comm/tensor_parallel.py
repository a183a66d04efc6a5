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

from ..kernels._runtime import compiling
from .gather_scatter import _dual_setup, _resized, all_gather_raw
from .protocol import group_name_of, group_of, resolve_group


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


# ----------------------------------------------------------------------------- torch.library

def _unaliased(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out``, copied if it shares ``x``'s memory (a view: an op's output may not alias its
    input)."""
    same = out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    return out.clone(memory_format=torch.contiguous_format) if same else out.contiguous()


@torch.library.custom_op("aiter_dist::gather_region", mutates_args=())
def _gather_region_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _unaliased(_gather_raw(x, group_of(group_name), dim), x)


@torch.library.custom_op("aiter_dist::split_region", mutates_args=())
def _split_region_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    return _unaliased(_split_raw(x, group_of(group_name), dim), x)


_gather_region_op.register_fake(lambda x, dim, group_name: _resized(x, dim, group_name, True))
_split_region_op.register_fake(lambda x, dim, group_name: _resized(x, dim, group_name, False))


torch.library.register_autograd(
    "aiter_dist::gather_region",
    lambda ctx, grad: (torch.ops.aiter_dist.split_region(grad, *ctx.args), None, None),
    setup_context=_dual_setup)
torch.library.register_autograd(
    "aiter_dist::split_region",
    lambda ctx, grad: (torch.ops.aiter_dist.gather_region(grad, *ctx.args), None, None),
    setup_context=_dual_setup)


# ----------------------------------------------------------------------------- functional API

def _gather(x, group, dim):
    if compiling():
        return torch.ops.aiter_dist.gather_region(x, dim, group_name_of(group))
    return GatherFunc.apply(x, resolve_group(group), dim)


def _split(x, group, dim):
    if compiling():
        return torch.ops.aiter_dist.split_region(x, dim, group_name_of(group))
    return SplitFunc.apply(x, resolve_group(group), dim)


def gather_last_dim(x, group=None):
    return _gather(x, group, -1)


def split_last_dim(x, group=None):
    return _split(x, group, -1)


def split_first_dim(x, group=None):
    """This rank's chunk of dim 0 of a replicated tensor; backward all-gathers the gradient."""
    return _split(x, group, 0)


def gather_first_dim(x, group=None):
    """All-gather along dim 0 for replicated computation after it; backward keeps this rank's
    slice of the gradient."""
    return _gather(x, group, 0)
