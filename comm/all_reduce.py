"""All-reduce (sum) over the symmetric workspace, with torch.distributed as the fallback.

Two kernels, each one launch on the protocol of ``comm/protocol.py`` (copy in, barrier, work,
barrier):

* one-shot: every rank reads the whole message from every peer and sums it. Least latency: one
  round of reads.
* two-shot: the message is cut into ``world`` chunks; rank ``r`` sums chunk ``r`` from every peer
  and writes the sum into every peer's buffer at the same place (reduce-scatter), meets its peers,
  then reads the other chunks from its own buffer (all-gather). Each rank moves ``2 (w-1)/w`` of
  the message over the links instead of ``w - 1``: the better choice for large messages.

Both sum in rank order with fp32 accumulation and round once, so every rank holds the same bits,
and both algorithms give the same bits as each other.

An input that already lives in the workspace (``aiter_dist.comm.workspace_tensor``) skips the copy
in. ``algo`` is ``"one_shot"``, ``"two_shot"``, ``"fallback"`` (``torch.distributed.all_reduce``) or
``"auto"``, which picks by message size (``policy.AUTO``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import cdiv, compiling, plan_cache
from .policy import route
from .protocol import (OP_NAMES, _finish, _meet, _peer_buf, _report_mismatch, _start,
                       check_comm_input, find_plan, group_name_of, group_of, launch_collective,
                       pieces)
from .workspace import max_grid

OP_ALL_REDUCE = 1
OP_NAMES[OP_ALL_REDUCE] = "all_reduce"
ALGOS = ("auto", "one_shot", "two_shot", "fallback")


# ----------------------------------------------------------------------------- reference

def all_reduce_ref(xs):
    """Sum of every rank's tensor in float64, in the inputs' dtype."""
    return torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)


# ----------------------------------------------------------------------------- kernels

# Header fields and rank-like ints are not specialized (a rank of 1 would otherwise become a
# compile-time constant, a different kernel per rank). numel and chunk stay specialized: knowing
# they are multiples of 16 is what lets the masked loads be 16 bytes wide (3x at 4 MB on H200).
@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "total", "key", "variant", "rank",
                               "world", "max_spins"])
def _all_reduce_kernel(
    IN, OUT,  # this rank's input piece (numel elements) and output
    BUF_PTRS, SIG_PTRS, ERR,  # workspace pointer tables [world] and error record
    seq, op_id, dtype_code, numel, total, key, variant,  # launch header (protocol.Header)
    rank, world, max_spins,
    chunk,  # elements per rank's chunk (two-shot), numel (one-shot)
    TWO_SHOT: tl.constexpr, COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr, ABORT_POLL: tl.constexpr,
    HWORDS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One-shot: one chunk of numel elements, reduced by every rank. Two-shot: world chunks of
    # ``chunk`` elements (the last ones short or empty); rank r reduces chunk r.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = OUT.dtype.element_ty
    offs0 = tl.arange(0, BLOCK)
    if TWO_SHOT:
        n_chunks = world
        mine = rank * chunk
    else:
        n_chunks = 1
        mine = 0
    failed, bad = _start(IN, BUF_PTRS, SIG_PTRS, ERR, numel, chunk, n_chunks, seq, op_id,
                         dtype_code, numel, total, key, variant, rank, world, max_spins, COPY_IN,
                         MAX_PROGRAMS, MAX_WORLD_, HEADER, ABORT_POLL, HWORDS, BLOCK)

    # Reduce this rank's chunk in rank order, fp32 accumulation, one rounding.
    if failed == 0:
        for start in range(pid * BLOCK, chunk, nprog * BLOCK):
            offs = mine + start + offs0
            mask = (start + offs0 < chunk) & (offs < numel)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in range(world):
                src = _peer_buf(BUF_PTRS, r, elem_ty, HEADER)
                acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            total_ = acc.to(elem_ty)
            tl.store(OUT + offs, total_, mask=mask)
            if TWO_SHOT:
                # Only this rank reads chunk ``rank`` of any buffer, and this program just read
                # these elements: writing the sum over them is safe.
                for r in range(world):
                    tl.store(_peer_buf(BUF_PTRS, r, elem_ty, HEADER) + offs, total_, mask=mask)

    _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad, MAX_PROGRAMS, MAX_WORLD_,
                     HWORDS)
    if TWO_SHOT:
        # Every peer's program pid has written its chunk's sums into this rank's buffer.
        if failed == 0:
            failed = _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, 1,
                           MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)
        if failed == 0:
            my_buf = _peer_buf(BUF_PTRS, rank, elem_ty, HEADER)
            for c in range(world):
                if c != rank:
                    for start in range(pid * BLOCK, chunk, nprog * BLOCK):
                        offs = c * chunk + start + offs0
                        mask = (start + offs0 < chunk) & (offs < numel)
                        tl.store(OUT + offs, tl.load(my_buf + offs, mask=mask, cache_modifier=".cg"),
                                 mask=mask)
        # No closing barrier: peers write into this buffer only after the next launch's start
        # barrier, which this program reaches after its reads above.
    else:
        _finish(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, failed,
                MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)


# ----------------------------------------------------------------------------- launchers

def _check_all_reduce_input(x, algo):
    if algo not in ALGOS:
        raise ValueError(f"aiter_dist.all_reduce: algo must be one of {', '.join(map(repr, ALGOS))}"
                         f", got {algo!r}")
    check_comm_input("all_reduce", "x", x)
    if not x.is_contiguous():
        raise ValueError(f"aiter_dist.all_reduce: x must be contiguous (strides {x.stride()}); "
                         f"call .contiguous() first")


def _launch_all_reduce(ws, call, x_flat, out_flat, two_shot, copy_in, plan=None):
    cpu = ws.device.type == "cpu"
    n = x_flat.numel()
    # The interpreter runs each block op as one numpy call: large blocks, few iterations.
    block = 16384 if cpu else 2048
    chunk = cdiv(cdiv(n, ws.world_size), 64) * 64 if two_shot else n
    programs = max(1, min(cdiv(chunk, block), max_grid(ws)))
    return launch_collective(_all_reduce_kernel, programs, ws, call, n, int(two_shot),
                             tensors=(x_flat, out_flat), scalars=(chunk,), plan=plan,
                             TWO_SHOT=two_shot, COPY_IN=copy_in, BLOCK=block,
                             num_warps=1 if cpu else 8)


# plan_key(x, group, algo, one_rank_kernel) -> the CollectivePlan of a message that takes one
# launch with a copy in (the input not the workspace tensor).
_plans = plan_cache()


def _kernel_all_reduce(x: torch.Tensor, ws, call, algo: str, key=None) -> torch.Tensor:
    """The one-shot or two-shot kernel. Messages larger than the workspace go in pieces; an input
    that is the group's workspace tensor skips the copy in. ``key``: the plan key under which a
    one-launch call leaves its plan."""
    out = torch.empty_like(x)
    xf, of = x.view(-1), out.view(-1)
    two_shot = algo == "two_shot"
    if ws.holds(x):
        _launch_all_reduce(ws, call, xf, of, two_shot, copy_in=False)
        return out
    # Pieces of whole 64-element blocks per rank. (Two-shot's padded chunks never touch the
    # elements past the message: every access is masked by numel.)
    cap = (ws.data_bytes // x.element_size()) // (64 * ws.world_size) * (64 * ws.world_size)
    if xf.numel() <= cap:
        plan = _launch_all_reduce(ws, call, xf, of, two_shot, copy_in=True,
                                  plan=None if key is None else ("all_reduce", algo))
        if plan is not None:
            _plans[key] = plan
        return out
    for a, b in pieces(xf.numel(), cap):
        _launch_all_reduce(ws, call, xf[a:b], of[a:b], two_shot, copy_in=True)
    return out


def fallback_all_reduce_raw(x: torch.Tensor, group=None):
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def all_reduce_raw(x: torch.Tensor, group=None, algo: str = "auto", *,
                   one_rank_kernel: bool = False) -> torch.Tensor:
    """Sum of ``x`` over ``group`` into a new tensor, no autograd. ``one_rank_kernel``: a group
    of one still runs the kernel (tests)."""
    key, plan = find_plan(_plans, x, group, algo, one_rank_kernel)
    if plan is not None:
        out = torch.empty_like(x)
        plan(x, out)
        return out
    _check_all_reduce_input(x, algo)
    r = route("all_reduce", OP_ALL_REDUCE, "all_reduce", x, group, algo,
              nbytes=x.numel() * x.element_size(), total=x.numel(),
              one_rank_kernel=one_rank_kernel)
    if r.path == "identity":
        return x.clone()
    if r.path == "fallback":
        return fallback_all_reduce_raw(x, group)
    return _kernel_all_reduce(x, r.ws, r.call, r.path, key)


def custom_all_reduce_raw(x: torch.Tensor, group=None, algo: str = "one_shot") -> torch.Tensor:
    """The one-shot or two-shot kernel, no autograd, whatever the auto table says (and for a
    group of one too)."""
    if algo not in ("one_shot", "two_shot"):
        raise ValueError(f"aiter_dist.custom_all_reduce_raw: algo must be 'one_shot' or "
                         f"'two_shot', got {algo!r}")
    return all_reduce_raw(x, group, algo, one_rank_kernel=True)


# ----------------------------------------------------------------------------- autograd

class AllReduceFunc(torch.autograd.Function):
    """Forward: sum over the group. Backward: identity (the reduce that ends a row-parallel layer;
    the gradient arriving here is already the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group, algo):
        return all_reduce_raw(x, group, algo)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class CopyToParallelRegionFunc(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce of the gradient (the input of a column-parallel
    layer: each rank's partial input gradient is summed so every rank holds the full one)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_raw(grad.contiguous(), ctx.group), None


# ----------------------------------------------------------------------------- torch.library

# The ops torch.compile traces (one node each; fake implementations give shapes). Groups travel
# by name, as in torch's functional collectives.

@torch.library.custom_op("aiter_dist::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, group_name: str, algo: str) -> torch.Tensor:
    return all_reduce_raw(x, group_of(group_name), algo)


@_all_reduce_op.register_fake
def _(x, group_name, algo):
    return torch.empty_like(x)


torch.library.register_autograd("aiter_dist::all_reduce", lambda ctx, grad: (grad, None, None))


@torch.library.custom_op("aiter_dist::copy_to_parallel_region", mutates_args=())
def _copy_to_parallel_region_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.clone()  # (an op's output may not alias its input)


@_copy_to_parallel_region_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _copy_to_parallel_region_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


torch.library.register_autograd(
    "aiter_dist::copy_to_parallel_region",
    lambda ctx, grad: (torch.ops.aiter_dist.all_reduce(grad.contiguous(), ctx.group_name, "auto"),
                       None),
    setup_context=_copy_to_parallel_region_setup)


# ----------------------------------------------------------------------------- functional API

def all_reduce(x: torch.Tensor, group=None, algo: str = "auto") -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` (default: the world); returns a new tensor.

    Args:
        x: a contiguous float32, float16 or bfloat16 tensor of any shape, on this rank's device
            (its current CUDA device, or the CPU). Every rank must pass the same shape and
            dtype, and the same ``algo``: ranks that differ get a ``RuntimeError``.
        group: the process group (default: the world).
        algo: ``"auto"`` (by message size, ``policy.AUTO``), ``"one_shot"``, ``"two_shot"`` or
            ``"fallback"`` (torch.distributed). ``aiter_dist.last_path("all_reduce")`` tells
            which served the call (``"identity"`` for a group of one).

    Numerics: the kernels sum in rank order with fp32 accumulation and round once, so every rank
    holds bitwise the same result, and one-shot and two-shot agree bitwise; the fallback has
    NCCL's or gloo's numerics. Autograd: the backward is the identity (the reduce that ends a
    row-parallel layer, Megatron's convention).
    """
    if compiling():
        return torch.ops.aiter_dist.all_reduce(x, group_name_of(group), algo)
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return AllReduceFunc.apply(x, group, algo)
    return all_reduce_raw(x, group, algo)  # no graph to record: skip autograd's overhead


def copy_to_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    if compiling():
        return torch.ops.aiter_dist.copy_to_parallel_region(x, group_name_of(group))
    return CopyToParallelRegionFunc.apply(x, group)
