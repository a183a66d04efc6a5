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
``"auto"``, which picks by message size from thresholds measured per device and world size
(``AUTO_ALL_REDUCE``; see the table's comment).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import launch, record_path, runs_triton
from .protocol import (DTYPE_CODE, OP_NAMES, _finish, _meet, _peer_buf, _report_mismatch, _start,
                       after_launch, auto_table, check_comm_errors, check_comm_input, max_spins,
                       resolve_group)
from .workspace import HEADER_BYTES, MAX_WORLD, get_workspace

OP_ALL_REDUCE = 1
OP_NAMES[OP_ALL_REDUCE] = "all_reduce"
ALGOS = ("auto", "one_shot", "two_shot", "fallback")

# algo="auto": per device row and world size, (largest message in bytes, algorithm) in increasing
# order; larger messages go to torch.distributed. "cuda" applies while a CUDA graph is captured,
# "cuda-eager" to eager calls, where every call pays the Python launch cost.
# cuda: benchmarks/results/h200.md (bench_allreduce.py, since folded into bench_collectives.py;
#   2x H200, bf16, graph replay): one-shot beats NCCL 1.16-1.30x from 4 KB to 4 MB and loses from
#   16 MB (113 vs 75 us). Two-shot has not been timed on a GPU yet, so auto does not pick it
#   there; other world sizes use the 2-GPU figures until runs on 4 and 8 GPUs retune them.
# cuda-eager: the kernel costs ~40 us of host time per call against NCCL's ~22-25 us up to 1 MB
#   and ties at 4 MB (38.8 vs 39.2 us): NCCL serves eager calls until launch gets cheaper.
# cpu: the CPU backend exists so the real kernels run in CI and in CPU training; gloo is faster
#   there, but small messages take the kernels so that CPU runs exercise both.
AUTO_ALL_REDUCE = {
    "cuda": {w: ((4 << 20, "one_shot"),) for w in range(2, MAX_WORLD + 1)},
    "cuda-eager": {w: () for w in range(2, MAX_WORLD + 1)},
    "cpu": {w: ((64 << 10, "one_shot"), (256 << 10, "two_shot")) for w in range(2, MAX_WORLD + 1)},
}


def auto_algo(device: torch.device, world: int, nbytes: int) -> str:
    """The algorithm ``algo="auto"`` takes for a message of ``nbytes`` (``"fallback"`` past the
    table). Other collectives of the same protocol use the same rows."""
    for limit, algo in AUTO_ALL_REDUCE[auto_table(device)].get(world, ()):
        if nbytes <= limit:
            return algo
    return "fallback"


def pick_algo(op: str, device: torch.device, world: int, nbytes: int,
              algo: str) -> tuple[str, str | None]:
    """What a call of any collective here takes: ``algo`` itself, the auto table's choice, or
    ``"fallback"`` (torch.distributed), with the reason when a kernel cannot serve at all."""
    if algo == "fallback":
        return "fallback", None
    if world > MAX_WORLD:
        return "fallback", f"world size {world} > {MAX_WORLD}"
    if not runs_triton(op, device):
        return "fallback", "CPU tensor on a GPU machine"
    if algo != "auto":
        return algo, None
    return auto_algo(device, world, nbytes), None


# ----------------------------------------------------------------------------- reference

def all_reduce_ref(xs):
    """Sum of every rank's tensor in float64, in the inputs' dtype."""
    return torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)


# ----------------------------------------------------------------------------- kernels

# Rank-like ints are not specialized: a value of 1 (rank 1, dtype code 1) would otherwise become a
# compile-time constant and a different kernel per rank. numel and chunk stay specialized: knowing
# they are multiples of 16 is what lets the masked loads be 16 bytes wide (3x at 4 MB on H200).
@triton.jit(do_not_specialize=["total", "rank", "world", "max_spins", "dtype_code", "op_id"])
def _all_reduce_kernel(
    IN, OUT, BUF_PTRS, SIG_PTRS, ERR,
    numel, chunk, total, rank, world, max_spins, dtype_code, op_id,
    TWO_SHOT: tl.constexpr, COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr, BLOCK: tl.constexpr,
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
    failed, bad, bad_numel, bad_dtype = _start(
        IN, BUF_PTRS, SIG_PTRS, ERR, numel, chunk, n_chunks, numel, total * 2 + TWO_SHOT,
        rank, world, max_spins, dtype_code, op_id, COPY_IN, MAX_PROGRAMS, MAX_WORLD_, HEADER, BLOCK)

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

    _report_mismatch(ERR, op_id, bad, bad_numel, bad_dtype, numel, dtype_code)
    if TWO_SHOT:
        # Every peer's program pid has written its chunk's sums into this rank's buffer.
        if failed == 0:
            failed = _meet(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, 1,
                           MAX_PROGRAMS, MAX_WORLD_)
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
        _finish(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, failed,
                MAX_PROGRAMS, MAX_WORLD_)


# ----------------------------------------------------------------------------- launchers

def _check_all_reduce_input(x):
    check_comm_input("all_reduce", "x", x)
    if not x.is_contiguous():
        raise ValueError(f"aiter_dist.all_reduce: x must be contiguous (strides {x.stride()}); "
                         f"call .contiguous() first")


def _launch_all_reduce(x_flat, out_flat, total, ws, two_shot, copy_in):
    cpu = x_flat.device.type == "cpu"
    n = x_flat.numel()
    # The interpreter runs each block op as one numpy call: large blocks, few iterations.
    block = 16384 if cpu else 2048
    chunk = triton.cdiv(triton.cdiv(n, ws.world_size), 64) * 64 if two_shot else n
    programs = max(1, min(triton.cdiv(chunk, block), ws.max_programs))
    launch(_all_reduce_kernel, (programs,), x_flat.device,
           x_flat, out_flat, ws.buffer_ptrs, ws.signal_ptrs, ws.err,
           n, chunk, min(total, 2**30 - 1), ws.rank, ws.world_size, max_spins(x_flat.device),
           DTYPE_CODE[x_flat.dtype], OP_ALL_REDUCE,
           TWO_SHOT=two_shot, COPY_IN=copy_in, MAX_PROGRAMS=ws.max_programs,
           MAX_WORLD_=MAX_WORLD, HEADER=HEADER_BYTES, BLOCK=block, num_warps=1 if cpu else 8)
    after_launch(ws, x_flat.device)


def _custom_all_reduce(x: torch.Tensor, group, algo: str) -> torch.Tensor:
    """The one-shot or two-shot kernel on a checked input. Messages larger than the workspace go
    in pieces; an input that is the group's workspace tensor skips the copy in."""
    ws = get_workspace(group, x.device)
    check_comm_errors(ws)
    out = torch.empty_like(x)
    xf, of = x.view(-1), out.view(-1)
    two_shot = algo == "two_shot"
    if ws.holds(x):
        _launch_all_reduce(xf, of, xf.numel(), ws, two_shot, copy_in=False)
        return out
    # Pieces of whole 64-element blocks per rank. (Two-shot's padded chunks never touch the
    # elements past the message: every access is masked by numel.)
    cap = (ws.data_bytes // x.element_size()) // (64 * ws.world_size) * (64 * ws.world_size)
    for start in range(0, xf.numel(), cap):
        stop = start + cap
        _launch_all_reduce(xf[start:stop], of[start:stop], xf.numel(), ws, two_shot,
                           copy_in=True)
    return out


def custom_all_reduce_raw(x: torch.Tensor, group=None, algo: str = "one_shot") -> torch.Tensor:
    """The one-shot or two-shot kernel, no autograd, whatever the auto table says."""
    _check_all_reduce_input(x)
    return _custom_all_reduce(x, group, algo)


def one_shot_all_reduce_raw(x: torch.Tensor, group=None) -> torch.Tensor:
    return custom_all_reduce_raw(x, group, "one_shot")


def fallback_all_reduce_raw(x: torch.Tensor, group=None):
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def all_reduce_raw(x: torch.Tensor, group=None, algo: str = "auto") -> torch.Tensor:
    """Sum of ``x`` over ``group`` into a new tensor, no autograd."""
    if algo not in ALGOS:
        raise ValueError(f"aiter_dist.all_reduce: algo must be one of {', '.join(map(repr, ALGOS))}"
                         f", got {algo!r}")
    _check_all_reduce_input(x)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if world == 1:
        record_path("all_reduce", "identity")
        return x.clone()
    chosen, reason = pick_algo("all_reduce", x.device, world, x.numel() * x.element_size(), algo)
    if chosen != "fallback":
        record_path("all_reduce", chosen)
        return _custom_all_reduce(x, group, chosen)
    record_path("all_reduce", "torch.distributed", reason)
    return fallback_all_reduce_raw(x, group)


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


# ----------------------------------------------------------------------------- functional API

def all_reduce(x: torch.Tensor, group=None, algo: str = "auto") -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group`` (default: the world); returns a new tensor.

    Every rank gets bitwise the same result. ``algo`` is ``"auto"``, ``"one_shot"``,
    ``"two_shot"`` or ``"fallback"`` (torch.distributed); ``aiter_dist.last_path("all_reduce")``
    tells which served.
    """
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return AllReduceFunc.apply(x, group, algo)
    return all_reduce_raw(x, group, algo)  # no graph to record: skip autograd's overhead


def copy_to_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return CopyToParallelRegionFunc.apply(x, group)
