"""Tensor-parallel linear layers (Megatron's conventions), in ``nn.Linear``'s weight layout.

* ``ColumnParallelLinear``: ``weight`` is this rank's ``(out_features / world, in_features)`` rows,
  ``bias`` the matching slice. The input is replicated; its gradient is all-reduced in backward so
  every rank holds the complete input gradient. ``gather_output=True`` all-gathers the output.
* ``RowParallelLinear``: ``weight`` is this rank's ``(out_features, in_features / world)`` columns;
  the partial products are all-reduced (``aiter_dist.all_reduce``), then the full ``bias`` is added
  once. ``input_is_parallel=False`` splits a replicated input first.

Sequence parallelism (``sequence_parallel=True``): the column-parallel layer takes this rank's
tokens (dim 0) and multiplies all of them with :func:`aiter_dist.all_gather_gemm`, the
row-parallel one returns this rank's tokens of the reduced output with
:func:`aiter_dist.gemm_reduce_scatter`: the communication runs under the GEMM.

Two switches let a caller fuse the communication with what follows or precedes it (``parallelize``
does, with the residual add and RMSNorm): ``RowParallelLinear.reduce_output = False`` returns the
partial products unreduced, and ``ColumnParallelLinear.input_gathered = True`` marks an input
that comes from an all-gather whose backward already sums the input gradient over the group.

Both multiply through ``aiter_dist.tgemm.mm`` (forward, dgrad and wgrad): our Triton GEMM for the
shape classes where the tuned table (``kernels/gemm_tuned.py``) measured it faster than the
vendor's, cuBLAS / hipBLASLt elsewhere, ``F.linear`` on CPU; ``tgemm.default_backend = "triton"``
forces ours. ``aiter_dist.last_path("tgemm.mm")`` says which served.

Both load their shard from a full, unsharded weight: ``layer.load_full_weight(w, b)`` or
``Layer.from_linear(nn_linear, group)``. A freshly constructed layer is the shard of a full layer
initialized like ``nn.Linear`` from the current RNG state: seed every rank the same.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..comm.all_reduce import all_reduce, copy_to_parallel_region
from ..comm.dist_gemm import all_gather_gemm, gemm_reduce_scatter
from ..comm.tensor_parallel import gather_last_dim, split_last_dim
from ..tgemm import mm


def _group_info(group):
    group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def _divide(n: int, world: int, what: str, layer: str) -> int:
    if n % world:
        raise ValueError(f"aiter_dist.nn.{layer}: {what}={n} is not divisible by the "
                         f"tensor-parallel world size {world}")
    return n // world


class _ParallelLinear(nn.Module):
    @torch.no_grad()
    def _reset(self):
        """nn.Linear's default init of the *full* layer, then this rank's shard of it: with the
        same seed on every rank (as tensor parallelism needs anyway) the shards form one layer
        and the replicated parts agree."""
        weight = torch.empty(self.out_features, self.in_features, device=self.weight.device,
                             dtype=self.weight.dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(weight, -bound, bound)
        bias = None
        if self.bias is not None:
            bias = torch.empty(self.out_features, device=weight.device, dtype=weight.dtype)
            nn.init.uniform_(bias, -bound, bound)
        self.load_full_weight(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, **kwargs):
        """A parallel layer holding this rank's shard of ``linear`` (same device and dtype)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    group=group, device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        layer.load_full_weight(linear.weight, linear.bias)
        return layer


class ColumnParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its output features split over ``group``: this rank computes
    ``x @ weight.T + bias`` for its ``out_features / world`` outputs.

    Args:
        in_features, out_features: the full layer's sizes; ``out_features`` must be divisible
            by the group's size.
        bias: whether the layer has a bias (this rank holds its slice).
        gather_output: all-gather the outputs so every rank returns all ``out_features``
            (default: this rank's slice, ready for a :class:`RowParallelLinear`).
        sequence_parallel: ``x`` holds this rank's tokens along dim 0; the layer computes every
            rank's tokens with :func:`aiter_dist.all_gather_gemm` (the gather overlapped with
            the GEMM), so the output has ``world`` times the rows. Not with ``gather_output``.
        group: the tensor-parallel group; default the world once torch.distributed is
            initialized, else a plain one-process layer.
        device, dtype: of the parameters.

    Parameters: ``weight`` is rows ``rank * out_features / world`` onwards of the full
    ``(out_features, in_features)`` weight, shape ``(out_features / world, in_features)``;
    ``bias`` the matching ``(out_features / world,)`` slice.

    Forward: ``x`` is ``(..., in_features)``, the same on every rank (replicated); the output is
    ``(..., out_features / world)``, or ``(..., out_features)`` with ``gather_output``, in x's
    dtype (or autocast's). Every rank must run the same calls with the same shapes and dtypes in
    the same order: the backward (and ``gather_output``) run collectives, which raise a
    ``RuntimeError`` on every rank when ranks disagree.

    Autograd: each rank's input gradient is partial (its slice of outputs only), so it is
    all-reduced over the group in the backward and comes out complete, and equal, on every rank;
    ``weight`` and ``bias`` get this rank's slices of the gradient. With ``gather_output`` the
    backward keeps this rank's slice of the output gradient (which must be the same on every
    rank).

    Numerics: the GEMM is ``aiter_dist.tgemm.mm`` (``last_path("tgemm.mm")``); the gradient's
    reduce is ``aiter_dist.all_reduce``, bitwise the same on every rank on its kernel paths.
    """

    # The dim along which each parameter is this rank's slice of the full one (checkpoints
    # reshard by it: aiter_dist.checkpoint).
    tp_shard_dims = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group=None, device=None, dtype=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.rank, self.world_size = _group_info(group)
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = _divide(out_features, self.world_size, "out_features",
                                    "ColumnParallelLinear")
        if sequence_parallel and gather_output:
            raise ValueError("aiter_dist.nn.ColumnParallelLinear: sequence_parallel=True gathers "
                             "the tokens, gather_output=True the features: choose one")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_gathered = False  # set by a caller that all-gathered the input itself
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_per_rank, device=device, dtype=dtype)) \
            if bias else None
        self._reset()

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Copy this rank's rows of a full ``(out_features, in_features)`` weight (and bias)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"aiter_dist.nn.ColumnParallelLinear.load_full_weight: expected a "
                             f"({self.out_features}, {self.in_features}) weight, got "
                             f"{tuple(weight.shape)}")
        rows = slice(self.rank * self.out_per_rank, (self.rank + 1) * self.out_per_rank)
        self.weight.copy_(weight[rows])
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias[rows])

    def forward(self, x):
        y = self.forward_shard(x)
        if self.gather_output and self.world_size > 1:
            y = gather_last_dim(y, self.group)
        return y

    def forward_shard(self, x):
        """This rank's slice of the outputs whatever ``gather_output`` says (a vocab-parallel
        loss takes the logits' shard from a head that otherwise gathers them)."""
        if self.sequence_parallel and self.world_size > 1:
            return all_gather_gemm(x, self.weight, self.bias, self.group)
        if self.world_size > 1 and not self.input_gathered:
            x = copy_to_parallel_region(x, self.group)
        return mm(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_per_rank} on this rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its input features split over ``group``: each rank multiplies its
    slice of the input by its columns of the weight, the partial products are all-reduced, and
    the full bias is added once: ``y = all_reduce(x_r @ weight.T) + bias``.

    Args:
        in_features, out_features: the full layer's sizes; ``in_features`` must be divisible by
            the group's size.
        bias: whether the layer has a bias (held whole on every rank).
        input_is_parallel: True (default): ``x`` is already this rank's slice
            ``(..., in_features / world)``, e.g. a :class:`ColumnParallelLinear`'s output.
            False: ``x`` is the replicated ``(..., in_features)`` and is split here (the
            backward all-gathers its gradient).
        group, device, dtype: as in :class:`ColumnParallelLinear`.
        sequence_parallel: return this rank's tokens (dim 0, ``1 / world`` of the rows) of the
            reduced output with :func:`aiter_dist.gemm_reduce_scatter` (the reduce-scatter
            overlapped with the GEMM) instead of every token all-reduced; the token count must
            divide by the group size. Needs ``input_is_parallel=True``.

    Parameters: ``weight`` is columns ``rank * in_features / world`` onwards of the full
    weight, shape ``(out_features, in_features / world)``; ``bias`` is ``(out_features,)``.

    Forward: returns ``(..., out_features)`` in x's dtype, the same on every rank. Setting
    ``reduce_output = False`` (layers without bias only) returns the partial product unreduced,
    for a caller that fuses the reduce with what follows (``parallelize`` does). Every rank must
    run the same calls with the same shapes and dtypes in the same order; ranks that disagree
    get a ``RuntimeError`` from the all-reduce on every rank.

    Autograd: the all-reduce's backward is the identity (Megatron's convention): the output
    gradient, the same on every rank, reaches each rank's slice; ``weight`` gets this rank's
    columns of the gradient, ``bias`` the whole (equal on every rank).

    Numerics: the GEMM is ``aiter_dist.tgemm.mm``; the all-reduce sums in rank order with fp32
    accumulation on its kernel paths (``last_path("all_reduce")``), so every rank holds bitwise
    the same output; torch.distributed's path has NCCL's or gloo's numerics.
    """

    # As in ColumnParallelLinear; the bias is whole on every rank (replicated).
    tp_shard_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group=None, device=None, dtype=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.rank, self.world_size = _group_info(group)
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = _divide(in_features, self.world_size, "in_features",
                                   "RowParallelLinear")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("aiter_dist.nn.RowParallelLinear: sequence_parallel=True needs "
                             "input_is_parallel=True (this rank's slice of the features)")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self._reduce_output = True
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) \
            if bias else None
        self._reset()

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Copy this rank's columns of a full ``(out_features, in_features)`` weight; the bias
        is kept whole (it is added once, after the reduce)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"aiter_dist.nn.RowParallelLinear.load_full_weight: expected a "
                             f"({self.out_features}, {self.in_features}) weight, got "
                             f"{tuple(weight.shape)}")
        cols = slice(self.rank * self.in_per_rank, (self.rank + 1) * self.in_per_rank)
        self.weight.copy_(weight[:, cols])
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)

    @property
    def reduce_output(self) -> bool:
        return self._reduce_output

    @reduce_output.setter
    def reduce_output(self, value: bool):
        if not value and self.bias is not None:
            raise ValueError("aiter_dist.nn.RowParallelLinear: reduce_output=False needs a layer "
                             "without bias (the bias must be added once, after the reduce)")
        self._reduce_output = bool(value)

    def forward(self, x):
        if not self.input_is_parallel and self.world_size > 1:
            x = split_last_dim(x, self.group)
        if x.shape[-1] != self.in_per_rank:
            raise ValueError(f"aiter_dist.nn.RowParallelLinear: input's last dimension "
                             f"{x.shape[-1]} must be this rank's shard {self.in_per_rank} of "
                             f"in_features={self.in_features} (input_is_parallel="
                             f"{self.input_is_parallel})")
        if self.sequence_parallel and self._reduce_output and self.world_size > 1:
            return gemm_reduce_scatter(x, self.weight, self.bias, self.group)
        y = mm(x, self.weight)
        if not self._reduce_output:
            return y  # partial: the caller reduces it
        if self.world_size > 1:
            y = all_reduce(y.contiguous(), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_per_rank} on this rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")
