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

from ..kernels._runtime import cdiv, compiling, plan_cache
from .policy import route
from .protocol import (OP_NAMES, _finish, _peer_buf, _report_mismatch, _start, check_comm_input,
                       find_plan, group_name_of, group_of, launch_collective, pieces,
                       resolve_group)
from .workspace import max_grid

OP_ALL_GATHER, OP_REDUCE_SCATTER = 2, 3
OP_NAMES.update({OP_ALL_GATHER: "all_gather", OP_REDUCE_SCATTER: "reduce_scatter"})


# ----------------------------------------------------------------------------- reference

def all_gather_ref(shards, dim=0):
    return torch.cat(shards, dim=dim)


def reduce_scatter_ref(tensors, rank, dim=0):
    total = torch.stack([t.double() for t in tensors]).sum(0)
    return total.chunk(len(tensors), dim=dim)[rank]


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "total", "key", "variant", "rank",
                               "world", "max_spins"])
def _gather_scatter_kernel(
    IN, OUT,  # gather: numel elements in, world * numel out; scatter: world * numel in, numel out
    BUF_PTRS, SIG_PTRS, ERR,  # workspace pointer tables [world] and error record
    seq, op_id, dtype_code, numel, total, key, variant,  # launch header (protocol.Header)
    rank, world, max_spins,
    REDUCE: tl.constexpr, COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr, ABORT_POLL: tl.constexpr,
    HWORDS: tl.constexpr, BLOCK: tl.constexpr,
):
    # numel: elements per rank (gathered from each, or scattered to each).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = OUT.dtype.element_ty
    offs0 = tl.arange(0, BLOCK)
    if REDUCE:
        n_chunks = world
    else:
        n_chunks = 1
    failed, bad = _start(IN, BUF_PTRS, SIG_PTRS, ERR, numel * n_chunks, numel, n_chunks, seq,
                         op_id, dtype_code, numel, total, key, variant, rank, world, max_spins,
                         COPY_IN, MAX_PROGRAMS, MAX_WORLD_, HEADER, ABORT_POLL, HWORDS, BLOCK)
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
    _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad, MAX_PROGRAMS, MAX_WORLD_,
                     HWORDS)
    _finish(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, failed,
            MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)


# ----------------------------------------------------------------------------- launchers

def _launch_flat(ws, call, x_flat, out_flat, n_per_rank, reduce, copy_in=True, plan=None):
    cpu = ws.device.type == "cpu"
    block = 16384 if cpu else 2048
    programs = max(1, min(cdiv(max(n_per_rank, 1), block), max_grid(ws)))
    return launch_collective(_gather_scatter_kernel, programs, ws, call, n_per_rank, 0,
                             tensors=(x_flat, out_flat), plan=plan, REDUCE=reduce,
                             COPY_IN=copy_in, BLOCK=block, num_warps=1 if cpu else 8)


# plan_key(x, group, dim, type(dim), algo) -> the CollectivePlan of a contiguous message that
# takes one launch with a copy in (reduce-scatter: split along dim 0, so x is already in
# rank-block order).
_ag_plans = plan_cache()
_rs_plans = plan_cache()


def _kernel_all_gather(x: torch.Tensor, ws, call, key=None) -> torch.Tensor:
    """(world, n): every rank's flat x in rank order. Large messages go in pieces. ``key``: the
    plan key under which a one-launch call of a contiguous x leaves its plan."""
    n, world = x.numel(), ws.world_size
    out = torch.empty(world, n, dtype=x.dtype, device=x.device)
    if ws.holds(x):
        _launch_flat(ws, call, x.view(-1), out.view(-1), n, False, copy_in=False)
        return out
    if not x.is_contiguous():
        key = None  # (the launch gets a copy: a plan would pass x itself)
    x = x.contiguous().view(-1)
    cap = (ws.data_bytes // x.element_size()) // 64 * 64
    for a, b in pieces(n, cap):
        if b - a == n:
            plan = _launch_flat(ws, call, x, out.view(-1), n, False,
                                plan=None if key is None else ("all_gather", "one_shot"))
            if plan is not None:
                _ag_plans[key] = plan
        else:
            part = torch.empty(world, b - a, dtype=x.dtype, device=x.device)
            _launch_flat(ws, call, x[a:b], part.view(-1), b - a, False)
            out[:, a:b] = part
    return out


def _kernel_reduce_scatter(x2: torch.Tensor, ws, call, key=None) -> torch.Tensor:
    """Chunk ``rank`` of the sum of ``x2`` (world, n), summed in rank order. In pieces if large.
    ``key``: the plan key under which a one-launch call leaves its plan (x2 then is the caller's
    x, viewed)."""
    world, n = x2.shape
    out = torch.empty(n, dtype=x2.dtype, device=x2.device)
    if ws.holds(x2):
        _launch_flat(ws, call, x2.view(-1), out, n, True, copy_in=False)
        return out
    cap = (ws.data_bytes // x2.element_size()) // (64 * world) * 64
    for a, b in pieces(n, cap):
        if b - a == n:
            plan = _launch_flat(ws, call, x2.view(-1), out, n, True,
                                plan=None if key is None else ("reduce_scatter", "one_shot"))
            if plan is not None:
                _rs_plans[key] = plan
        else:
            _launch_flat(ws, call, x2[:, a:b].contiguous().view(-1), out[a:b], b - a, True)
    return out


def _fallback_all_gather(x, group, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def _fallback_reduce_scatter(x2, group, rank):
    if x2.device.type == "cpu" or dist.get_backend(group) == "gloo":
        total = x2.clone()
        dist.all_reduce(total, group=group)  # gloo has no reduce-scatter
        return total[rank].clone()
    out = torch.empty_like(x2[0])
    dist.reduce_scatter_tensor(out, x2, group=group)
    return out


def _check(op, x, dim, algo):
    check_comm_input(op, "x", x, ndim_min=1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"aiter_dist.{op}: dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"aiter_dist.{op}: dim {dim} is out of range for a {x.dim()}-D tensor")
    if algo not in ("auto", "one_shot", "fallback"):
        raise ValueError(f"aiter_dist.{op}: algo must be 'auto', 'one_shot' or 'fallback', "
                         f"got {algo!r}")
    return dim % x.dim()


def _gathered(stacked, x, dim, world):
    # (world, ..., d_dim, ...) -> (..., world * d_dim, ...): shard r at rows r*d .. (r+1)*d.
    moved = stacked.movedim(0, dim)
    return moved.reshape(*x.shape[:dim], world * x.shape[dim], *x.shape[dim + 1:])


def all_gather_raw(x, dim=0, group=None, algo="auto"):
    key, plan = find_plan(_ag_plans, x, group, dim, type(dim), algo)  # (True, 1.0 hash as 1)
    if plan is not None:
        world = plan.st.world_size
        out = torch.empty(world, x.numel(), dtype=x.dtype, device=x.device)
        plan(x, out)
        return _gathered(out.view(world, *x.shape), x, plan.extra, world)
    dim = _check("all_gather", x, dim, algo)
    nbytes = x.numel() * x.element_size()
    r = route("all_gather", OP_ALL_GATHER, "gather_scatter", x, group, algo, nbytes=nbytes,
              total=x.numel(), dim=dim)
    if r.path == "identity":
        return x.clone(memory_format=torch.contiguous_format)
    world = r.world
    if r.path == "fallback":
        stacked = _fallback_all_gather(x.contiguous(), resolve_group(group), world)
    else:
        stacked = _kernel_all_gather(x, r.ws, r.call, key).view(world, *x.shape)
        plan = _ag_plans.get(key)
        if plan is not None:
            plan.extra = dim
    return _gathered(stacked, x, dim, world)


def reduce_scatter_raw(x, dim=0, group=None, algo="auto"):
    key, plan = find_plan(_rs_plans, x, group, dim, type(dim), algo)
    if plan is not None:
        out = torch.empty(plan.extra, dtype=x.dtype, device=x.device)
        plan(x, out)
        return out
    dim = _check("reduce_scatter", x, dim, algo)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"aiter_dist.reduce_scatter: x.shape[{dim}]={x.shape[dim]} is not "
                         f"divisible by the world size {world}; pad it to a multiple of {world}")
    r = route("reduce_scatter", OP_REDUCE_SCATTER, "gather_scatter", x, group, algo,
              nbytes=x.numel() * x.element_size(), total=x.numel(), dim=dim)
    if r.path == "identity":
        return x.clone(memory_format=torch.contiguous_format)
    chunk = x.shape[dim] // world
    # (..., world * c, ...) -> (world, ..., c, ...), contiguous: chunk r is block r.
    x2 = x.unflatten(dim, (world, chunk)).movedim(dim, 0).contiguous()
    out_shape = x2.shape[1:]
    if r.path == "fallback":
        out = _fallback_reduce_scatter(x2.view(world, -1), group, dist.get_rank(group))
    else:
        # A plan passes x itself: only where x2 is x's memory in the same order.
        planned = x.is_contiguous() and x2.data_ptr() == x.data_ptr()
        out = _kernel_reduce_scatter(x2.view(world, -1), r.ws, r.call, key if planned else None)
        plan = _rs_plans.get(key) if planned else None
        if plan is not None:
            plan.extra = out_shape
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


# ----------------------------------------------------------------------------- torch.library

def _resized(x, dim, group_name, grow):
    """A fake output: x with ``dim`` multiplied (grow) or divided by the group's size."""
    world = group_of(group_name).size()
    shape = list(x.shape)
    shape[dim] = shape[dim] * world if grow else shape[dim] // world
    return x.new_empty(shape)


@torch.library.custom_op("aiter_dist::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, dim: int, group_name: str, algo: str) -> torch.Tensor:
    return all_gather_raw(x, dim, group_of(group_name), algo)


@torch.library.custom_op("aiter_dist::reduce_scatter", mutates_args=())
def _reduce_scatter_op(x: torch.Tensor, dim: int, group_name: str, algo: str) -> torch.Tensor:
    return reduce_scatter_raw(x, dim, group_of(group_name), algo)


_all_gather_op.register_fake(lambda x, dim, group_name, algo: _resized(x, dim, group_name, True))
_reduce_scatter_op.register_fake(
    lambda x, dim, group_name, algo: _resized(x, dim, group_name, False))


def _dual_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


torch.library.register_autograd(
    "aiter_dist::all_gather",
    lambda ctx, grad: (torch.ops.aiter_dist.reduce_scatter(grad, *ctx.args), None, None, None),
    setup_context=_dual_setup)
torch.library.register_autograd(
    "aiter_dist::reduce_scatter",
    lambda ctx, grad: (torch.ops.aiter_dist.all_gather(grad, *ctx.args), None, None, None),
    setup_context=_dual_setup)


# ----------------------------------------------------------------------------- functional API

def all_gather(x, dim=0, group=None, *, algo="auto"):
    """Concatenate every rank's ``x`` along ``dim``, in rank order.

    Every rank must pass the same shape, dtype and dim (a mismatch raises on every rank); ``x``
    is float32, float16 or bfloat16 on this rank's device. Returns ``x.shape`` with ``dim``
    multiplied by the world size. ``algo``: ``"auto"``, ``"one_shot"`` (the kernel) or
    ``"fallback"`` (torch.distributed); ``last_path("all_gather")`` records which served. The
    kernel copies bits, so every rank holds the same result. Autograd: the backward is a
    reduce-scatter of the gradient along ``dim`` (Megatron's sequence parallelism)."""
    if compiling():
        return torch.ops.aiter_dist.all_gather(x, dim, group_name_of(group), algo)
    if x.requires_grad and torch.is_grad_enabled():
        return AllGatherFunc.apply(x, dim, group, algo)
    return all_gather_raw(x, dim, group, algo)


def reduce_scatter(x, dim=0, group=None, *, algo="auto"):
    """Sum ``x`` over the ranks and keep this rank's chunk of ``dim``.

    ``x.shape[dim]`` must be divisible by the world size, and every rank must pass the same
    shape, dtype and dim. Returns ``x.shape`` with ``dim`` divided by the world size. The kernel
    sums in rank order in fp32 and rounds once: bitwise the same on every rank (the fallback has
    NCCL's or gloo's numerics). ``algo`` as for :func:`all_gather`. Autograd: the backward is an
    all-gather of the gradient along ``dim``."""
    if compiling():
        return torch.ops.aiter_dist.reduce_scatter(x, dim, group_name_of(group), algo)
    if x.requires_grad and torch.is_grad_enabled():
        return ReduceScatterFunc.apply(x, dim, group, algo)
    return reduce_scatter_raw(x, dim, group, algo)
