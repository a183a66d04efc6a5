"""All-gather and reduce-scatter over the symmetric workspace, with torch.distributed as fallback.

One launch each, on the protocol of ``comm/protocol.py``: copy this rank's input into its
workspace buffer (or find it there already), barrier, read the peers' buffers, barrier. A missing
or mismatched rank raises the same errors as the all-reduce.

* all-gather: rank r's n elements land at ``out[r*n:(r+1)*n]`` on every rank;
* reduce-scatter: rank r receives chunk r of the sum, summed in rank order in fp32, so every
  layout of ranks yields the same bits.

Other ``dim``s are moved to the front around the flat kernels. Autograd follows Megatron's
sequence-parallel conventions: the backward of all-gather is reduce-scatter and vice versa.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import launch, record_path
from .all_reduce import pick_algo
from .protocol import (DTYPE_CODE, OP_NAMES, _finish, _peer_buf, _report_mismatch, _start,
                       after_launch, check_comm_errors, check_comm_input, max_spins, resolve_group)
from .workspace import HEADER_BYTES, MAX_WORLD, get_workspace

OP_ALL_GATHER, OP_REDUCE_SCATTER = 2, 3
OP_NAMES.update({OP_ALL_GATHER: "all_gather", OP_REDUCE_SCATTER: "reduce_scatter"})


# ----------------------------------------------------------------------------- reference

def all_gather_ref(shards, dim=0):
    return torch.cat(shards, dim=dim)


def reduce_scatter_ref(tensors, rank, dim=0):
    total = torch.stack([t.double() for t in tensors]).sum(0)
    return total.chunk(len(tensors), dim=dim)[rank]


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["total", "rank", "world", "max_spins", "dtype_code", "op_id"])
def _gather_scatter_kernel(
    IN, OUT, BUF_PTRS, SIG_PTRS, ERR,
    numel, total, rank, world, max_spins, dtype_code, op_id,
    REDUCE: tl.constexpr, COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr, BLOCK: tl.constexpr,
):
    # numel: elements per rank (gathered from each, or scattered to each); the input holds numel
    # (gather) or world chunks of numel (reduce-scatter) elements.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = OUT.dtype.element_ty
    offs0 = tl.arange(0, BLOCK)
    if REDUCE:
        n_chunks = world
    else:
        n_chunks = 1
    failed, bad, bad_numel, bad_dtype = _start(
        IN, BUF_PTRS, SIG_PTRS, ERR, numel * n_chunks, numel, n_chunks, numel, total,
        rank, world, max_spins, dtype_code, op_id, COPY_IN, MAX_PROGRAMS, MAX_WORLD_, HEADER, BLOCK)
    if failed == 0:
        for start in range(pid * BLOCK, numel, nprog * BLOCK):
            offs = start + offs0
            mask = offs < numel
            if REDUCE:
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for r in range(world):
                    src = _peer_buf(BUF_PTRS, r, elem_ty, HEADER)
                    acc += tl.load(src + tl.cast(rank, tl.int64) * numel + offs, mask=mask,
                                   other=0.0, cache_modifier=".cg").to(tl.float32)
                tl.store(OUT + offs, acc.to(elem_ty), mask=mask)
            else:
                for r in range(world):
                    src = _peer_buf(BUF_PTRS, r, elem_ty, HEADER)
                    tl.store(OUT + tl.cast(r, tl.int64) * numel + offs,
                             tl.load(src + offs, mask=mask, cache_modifier=".cg"), mask=mask)
    _report_mismatch(ERR, op_id, bad, bad_numel, bad_dtype, numel, dtype_code)
    _finish(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, failed,
            MAX_PROGRAMS, MAX_WORLD_)


# ----------------------------------------------------------------------------- launchers

def _launch_flat(x_flat, out_flat, n_per_rank, total, ws, reduce, op_id, copy_in=True):
    cpu = x_flat.device.type == "cpu"
    block = 16384 if cpu else 2048
    programs = min(triton.cdiv(max(n_per_rank, 1), block), ws.max_programs)
    launch(_gather_scatter_kernel, (programs,), x_flat.device,
           x_flat, out_flat, ws.buffer_ptrs, ws.signal_ptrs, ws.err,
           n_per_rank, min(total, 2**31 - 1), ws.rank, ws.world_size, max_spins(x_flat.device),
           DTYPE_CODE[x_flat.dtype], op_id,
           REDUCE=reduce, COPY_IN=copy_in, MAX_PROGRAMS=ws.max_programs, MAX_WORLD_=MAX_WORLD,
           HEADER=HEADER_BYTES, BLOCK=block, num_warps=1 if cpu else 8)
    after_launch(ws, x_flat.device)


def one_shot_all_gather_raw(x: torch.Tensor, group=None) -> torch.Tensor:
    """(world, *x.shape): every rank's x in rank order. Large messages go in pieces."""
    ws = get_workspace(group, x.device)
    check_comm_errors(ws)
    n, world = x.numel(), ws.world_size
    out = torch.empty(world, n, dtype=x.dtype, device=x.device)
    if ws.holds(x):
        _launch_flat(x.view(-1), out.view(-1), n, n, ws, False, OP_ALL_GATHER, copy_in=False)
        return out
    x = x.contiguous().view(-1)
    cap = (ws.data_bytes // x.element_size()) // 64 * 64
    for start in range(0, n, cap):
        m = min(cap, n - start)
        if m == n:
            _launch_flat(x, out.view(-1), n, n, ws, False, OP_ALL_GATHER)
        else:
            part = torch.empty(world, m, dtype=x.dtype, device=x.device)
            _launch_flat(x[start:start + m], part.view(-1), m, n, ws, False, OP_ALL_GATHER)
            out[:, start:start + m] = part
    return out


def one_shot_reduce_scatter_raw(x: torch.Tensor, group=None) -> torch.Tensor:
    """Chunk ``rank`` of the sum of the flat x (numel divisible by world). In pieces if large."""
    ws = get_workspace(group, x.device)
    check_comm_errors(ws)
    world = ws.world_size
    x2 = x.contiguous().view(world, -1)
    n = x2.shape[1]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if ws.holds(x2):
        _launch_flat(x2.view(-1), out, n, n, ws, True, OP_REDUCE_SCATTER, copy_in=False)
        return out
    cap = (ws.data_bytes // x.element_size()) // (64 * world) * 64
    for start in range(0, n, cap):
        m = min(cap, n - start)
        src = x2.view(-1) if m == n else x2[:, start:start + m].contiguous().view(-1)
        _launch_flat(src, out[start:start + m], m, n, ws, True, OP_REDUCE_SCATTER)
    return out


def _fallback_all_gather(x, group, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def _fallback_reduce_scatter(x2, group, rank):
    if dist.get_backend(group) == "gloo" or x2.device.type == "cpu":
        total = x2.clone()
        dist.all_reduce(total, group=group)  # gloo has no reduce-scatter
        return total[rank].clone()
    out = torch.empty_like(x2[0])
    dist.reduce_scatter_tensor(out, x2, group=group)
    return out


def _use_kernel(op, x, world, algo):
    # Not yet measured for these ops: the all-reduce's table (same protocol, same costs); either
    # of its kernels means "this size is worth a kernel".
    chosen, reason = pick_algo(op, x.device, world, x.numel() * x.element_size(), algo)
    return chosen != "fallback", reason


def _check(op, x, dim, algo):
    check_comm_input(op, "x", x, ndim_min=1)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"aiter_dist.{op}: dim {dim} is out of range for a {x.dim()}-D tensor")
    if algo not in ("auto", "one_shot", "fallback"):
        raise ValueError(f"aiter_dist.{op}: algo must be 'auto', 'one_shot' or 'fallback', "
                         f"got {algo!r}")
    return dim % x.dim()


def all_gather_raw(x, dim=0, group=None, algo="auto"):
    dim = _check("all_gather", x, dim, algo)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if world == 1:
        record_path("all_gather", "identity")
        return x.clone()
    kernel, reason = _use_kernel("all_gather", x, world, algo)
    if kernel:
        record_path("all_gather", "one_shot")
        stacked = one_shot_all_gather_raw(x, group).view(world, *x.shape)
    else:
        record_path("all_gather", "torch.distributed", reason)
        stacked = _fallback_all_gather(x.contiguous(), group, world)
    # (world, ..., d_dim, ...) -> (..., world * d_dim, ...): shard r at rows r*d .. (r+1)*d.
    moved = stacked.movedim(0, dim)
    return moved.reshape(*x.shape[:dim], world * x.shape[dim], *x.shape[dim + 1:])


def reduce_scatter_raw(x, dim=0, group=None, algo="auto"):
    dim = _check("reduce_scatter", x, dim, algo)
    group = resolve_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(f"aiter_dist.reduce_scatter: x.shape[{dim}]={x.shape[dim]} is not "
                         f"divisible by the world size {world}; pad it to a multiple of {world}")
    if world == 1:
        record_path("reduce_scatter", "identity")
        return x.clone()
    chunk = x.shape[dim] // world
    # (..., world * c, ...) -> (world, ..., c, ...), contiguous: chunk r is block r.
    x2 = x.unflatten(dim, (world, chunk)).movedim(dim, 0).contiguous()
    out_shape = x2.shape[1:]
    kernel, reason = _use_kernel("reduce_scatter", x, world, algo)
    if kernel:
        record_path("reduce_scatter", "one_shot")
        out = one_shot_reduce_scatter_raw(x2, group)
    else:
        record_path("reduce_scatter", "torch.distributed", reason)
        out = _fallback_reduce_scatter(x2.view(world, -1), group, rank)
    return out.view(out_shape)


# ----------------------------------------------------------------------------- autograd

class AllGatherFunc(torch.autograd.Function):
    """Forward: gather shards along ``dim``. Backward: reduce-scatter (each rank's gradient of the
    gathered tensor is partial in sequence parallelism)."""

    @staticmethod
    def forward(ctx, x, dim, group, algo):
        ctx.args = (dim, group, algo)
        return all_gather_raw(x, dim, group, algo)

    @staticmethod
    def backward(ctx, grad):
        dim, group, algo = ctx.args
        return reduce_scatter_raw(grad, dim, group, algo), None, None, None


class ReduceScatterFunc(torch.autograd.Function):
    """Forward: sum over ranks, keep this rank's chunk of ``dim``. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group, algo):
        ctx.args = (dim, group, algo)
        return reduce_scatter_raw(x, dim, group, algo)

    @staticmethod
    def backward(ctx, grad):
        dim, group, algo = ctx.args
        return all_gather_raw(grad, dim, group, algo), None, None, None


# ----------------------------------------------------------------------------- functional API

def all_gather(x, dim=0, group=None, *, algo="auto"):
    """Concatenate every rank's ``x`` along ``dim`` (rank order). ``algo`` as for all_reduce."""
    if x.requires_grad and torch.is_grad_enabled():
        return AllGatherFunc.apply(x, dim, group, algo)
    return all_gather_raw(x, dim, group, algo)


def reduce_scatter(x, dim=0, group=None, *, algo="auto"):
    """Sum ``x`` over the ranks and keep this rank's chunk of ``dim`` (size divisible by world)."""
    if x.requires_grad and torch.is_grad_enabled():
        return ReduceScatterFunc.apply(x, dim, group, algo)
    return reduce_scatter_raw(x, dim, group, algo)
