"""All-reduce (sum) over the symmetric workspace, with torch.distributed as the fallback.

One-shot algorithm, one launch:
  1. every program copies its share of the input into this rank's workspace buffer;
  2. start barrier (per program, with every peer's program of the same index);
  3. every program reads its share from all ranks' buffers, sums in rank order in fp32, and writes
     the output: every rank computes the same sum in the same order, so all hold the same bits;
  4. end barrier, so no rank overwrites its buffer while a peer still reads it.

Program ``p`` always owns the same elements in steps 1 and 3, so a barrier per program suffices.
Waits are bounded: a peer that never arrives sets the workspace's error record, and the host raises
``RuntimeError`` naming the op, the group and the missing rank.

``algo``: ``"one_shot"`` (the kernel), ``"fallback"`` (``torch.distributed.all_reduce``), or
``"auto"``, which takes the kernel up to a message size measured per device type and world size
(``AUTO_ONE_SHOT_MAX_BYTES``; see the table's comment).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import FLOAT_DTYPES, check_tensor, launch, record_path, runs_triton
from .workspace import (ERR_MISMATCH, ERR_NONE, ERR_TIMEOUT, HEADER_BYTES, MAX_WORLD,
                        get_workspace)

OP_ALL_REDUCE = 1
_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}

# Largest message (bytes) that algo="auto" sends through the one-shot kernel, by device type and
# world size; larger ones go to torch.distributed.
# cuda: benchmarks/results/h200.md (bench_allreduce.py, 2x H200, bf16, CUDA-graph replay): the
#   one-shot kernel beats NCCL 1.16-1.30x from 4 KB to 4 MB, and loses from 16 MB (113 vs 75 us).
#   Other world sizes have not been measured: they use the same threshold until runs on 4 and 8
#   GPUs retune it.
# cpu: the CPU backend exists so the real kernels run in CI and in CPU training; gloo is faster
#   there, but small messages take the kernel so that CPU runs exercise it.
AUTO_ONE_SHOT_MAX_BYTES = {
    "cuda": {w: 4 << 20 for w in range(2, MAX_WORLD + 1)},
    "cpu": {w: 256 << 10 for w in range(2, MAX_WORLD + 1)},
}


def _timeout_s() -> float:
    return float(os.environ.get("AITER_DIST_COMM_TIMEOUT_S", "60"))


# AITER_DIST_SYNC_CHECK=1: synchronize after every GPU collective and raise at once on a missing
# peer (debugging); by default the error surfaces at the next collective or check_errors().
_SYNC_CHECK = os.environ.get("AITER_DIST_SYNC_CHECK") == "1"


# Polls per second of a waiting program, used to turn the timeout into a spin bound. The GPU figure
# is about one system-scope atomic round trip; the interpreter's is measured on a 2-core CPU.
_POLLS_PER_S = {"cpu": 2e4, "cuda": 2e6}


# ----------------------------------------------------------------------------- reference

def all_reduce_ref(tensors):
    """The sum of the per-rank tensors, in rank order, in fp64."""
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t in tensors:
        out += t.to(torch.float64)
    return out


# ----------------------------------------------------------------------------- kernels

# Rank-like ints are not specialized: a value of 1 (rank 1, dtype code 1) would otherwise become a
# compile-time constant and a different kernel per rank. numel stays specialized: knowing it is a
# multiple of 16 is what lets the masked loads be 16 bytes wide (3x at 4 MB on H200).
@triton.jit(do_not_specialize=["rank", "world", "max_spins", "dtype_code", "op_id"])
def _one_shot_all_reduce_kernel(
    IN, OUT, BUF_PTRS, SIG_PTRS, ERR,
    numel, rank, world, max_spins, dtype_code, op_id,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = IN.dtype.element_ty
    offs0 = tl.arange(0, BLOCK)
    my_base = tl.load(BUF_PTRS + rank)
    my_hdr = my_base.to(tl.pointer_type(tl.int64))
    my_buf = tl.multiple_of((my_base + HEADER).to(tl.pointer_type(elem_ty)), 16)

    # 1. copy in; program 0 also writes this launch's header for the peers to check.
    if pid == 0:
        tl.store(my_hdr, numel)
        tl.store(my_hdr + 1, dtype_code)
    for start in range(pid * BLOCK, numel, nprog * BLOCK):
        offs = start + offs0
        mask = offs < numel
        tl.store(my_buf + offs, tl.load(IN + offs, mask=mask), mask=mask)

    # 2. start barrier (channel 0). Sync the program first: one thread signals for all of them.
    tl.debug_barrier()
    my_sig = tl.load(SIG_PTRS + rank).to(tl.pointer_type(tl.int32))
    timed_out = 0
    for r in range(world):
        peer_sig = tl.load(SIG_PTRS + r).to(tl.pointer_type(tl.int32))
        slot = peer_sig + pid * MAX_WORLD_ + rank
        spins = 0
        while (tl.atomic_cas(slot, 0, 1, sem="release", scope="sys") != 0) & (spins < max_spins):
            spins += 1
        if spins >= max_spins:
            timed_out = 1
    for r in range(world):
        slot = my_sig + pid * MAX_WORLD_ + r
        spins = 0
        while (tl.atomic_cas(slot, 1, 0, sem="acquire", scope="sys") != 1) & (spins < max_spins):
            spins += 1
        if (spins >= max_spins) & (timed_out == 0):
            timed_out = 1
            tl.store(ERR + 1, op_id)
            tl.store(ERR + 2, r)
            tl.store(ERR + 3, pid)
            tl.atomic_xchg(ERR, 1, sem="release", scope="sys")
    tl.debug_barrier()

    # Peers must have launched the same message (program 0 checks; peers' program 0 wrote it).
    if (pid == 0) & (timed_out == 0):
        for r in range(world):
            peer_hdr = tl.load(BUF_PTRS + r).to(tl.pointer_type(tl.int64))
            peer_numel = tl.load(peer_hdr, volatile=True)
            peer_dtype = tl.load(peer_hdr + 1, volatile=True)
            if (peer_numel != numel) | (peer_dtype != dtype_code):
                tl.store(ERR + 1, op_id)
                tl.store(ERR + 2, r)
                tl.store(ERR + 3, peer_dtype.to(tl.int32))
                tl.store(ERR + 4, numel)
                tl.store(ERR + 5, peer_numel.to(tl.int32))
                tl.atomic_xchg(ERR, 2, sem="release", scope="sys")

    # 3. reduce in rank order, fp32 accumulation.
    for start in range(pid * BLOCK, numel, nprog * BLOCK):
        offs = start + offs0
        mask = offs < numel
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(world):
            peer = tl.multiple_of((tl.load(BUF_PTRS + r) + HEADER).to(tl.pointer_type(elem_ty)), 16)
            acc += tl.load(peer + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)

    # 4. end barrier (channel 1): peers are done reading this rank's buffer.
    tl.debug_barrier()
    if timed_out == 0:
        for r in range(world):
            peer_sig = tl.load(SIG_PTRS + r).to(tl.pointer_type(tl.int32))
            slot = peer_sig + (MAX_PROGRAMS + pid) * MAX_WORLD_ + rank
            spins = 0
            while (tl.atomic_cas(slot, 0, 1, sem="release", scope="sys") != 0) & (spins < max_spins):
                spins += 1
        for r in range(world):
            slot = my_sig + (MAX_PROGRAMS + pid) * MAX_WORLD_ + r
            spins = 0
            while (tl.atomic_cas(slot, 1, 0, sem="acquire", scope="sys") != 1) & (spins < max_spins):
                spins += 1
            if (spins >= max_spins) & (timed_out == 0):
                timed_out = 1
                tl.store(ERR + 1, op_id)
                tl.store(ERR + 2, r)
                tl.store(ERR + 3, pid)
                tl.atomic_xchg(ERR, 1, sem="release", scope="sys")


# ----------------------------------------------------------------------------- launchers

def check_comm_errors(ws) -> None:
    """Raise if a kernel on ``ws`` reported a missing or mismatched peer (reads host memory)."""
    code = int(ws.err_host[0])  # numpy view of the record: no tensor op on the hot path
    if code == ERR_NONE:
        return
    fields = ws.err.tolist()
    ws.err.zero_()
    op = {OP_ALL_REDUCE: "all_reduce"}.get(fields[1], f"op {fields[1]}")
    if code == ERR_TIMEOUT:
        ws.broken = "timeout"
        raise RuntimeError(
            f"aiter_dist.{op}: rank {fields[2]} of {ws.describe()} did not arrive within "
            f"{_timeout_s():.0f} s (program {fields[3]}); check that every rank of the group calls "
            f"the same collectives in the same order (AITER_DIST_COMM_TIMEOUT_S sets the wait)")
    if code == ERR_MISMATCH:
        raise RuntimeError(
            f"aiter_dist.{op}: rank {fields[2]} of {ws.describe()} launched a different message "
            f"({fields[5]} elements, dtype code {fields[3]}) than this rank ({fields[4]} elements); "
            f"every rank must pass tensors of the same shape and dtype")


def _check_all_reduce_input(x):
    check_tensor("all_reduce", "x", x, dtypes=FLOAT_DTYPES, ndim_min=0)
    if not x.is_contiguous():
        raise ValueError(f"aiter_dist.all_reduce: x must be contiguous (strides {x.stride()}); "
                         f"call .contiguous() first")


def one_shot_all_reduce_raw(x: torch.Tensor, group=None, out: torch.Tensor | None = None):
    """The one-shot kernel, no autograd. Messages larger than the workspace go in pieces."""
    _check_all_reduce_input(x)
    ws = get_workspace(group, x.device)
    check_comm_errors(ws)
    out = torch.empty_like(x) if out is None else out
    xf, of = x.view(-1), out.view(-1)
    cpu = x.device.type == "cpu"
    cap = (ws.data_bytes // x.element_size()) // 64 * 64
    # The interpreter runs each block op as one numpy call: large blocks, few iterations.
    block = 16384 if cpu else 2048
    max_spins = int(_timeout_s() * _POLLS_PER_S["cpu" if cpu else "cuda"])
    for start in range(0, xf.numel(), cap):
        n = min(cap, xf.numel() - start)
        src, dst = (xf, of) if n == xf.numel() else (xf[start:start + n], of[start:start + n])
        programs = min(triton.cdiv(n, block), ws.max_programs)
        launch(_one_shot_all_reduce_kernel, (programs,), x.device,
               src, dst, ws.buffer_ptrs, ws.signal_ptrs, ws.err,
               n, ws.rank, ws.world_size, max_spins, _DTYPE_CODE[x.dtype], OP_ALL_REDUCE,
               MAX_PROGRAMS=ws.max_programs, MAX_WORLD_=MAX_WORLD, HEADER=HEADER_BYTES, BLOCK=block,
               num_warps=1 if cpu else 8)
        if cpu or _SYNC_CHECK:
            if not cpu:
                torch.cuda.current_stream(x.device).synchronize()
            check_comm_errors(ws)
    return out


def fallback_all_reduce_raw(x: torch.Tensor, group=None):
    out = x.clone()
    dist.all_reduce(out, group=group)
    return out


def _pick_algo(x: torch.Tensor, world: int, algo: str) -> tuple[str, str | None]:
    """(algorithm, reason it is not the custom kernel or None)."""
    if algo == "fallback":
        return "fallback", None
    if world > MAX_WORLD:
        return "fallback", f"world size {world} > {MAX_WORLD}"
    if not runs_triton("all_reduce", x.device):
        return "fallback", "CPU tensor on a GPU machine"
    if algo == "one_shot":
        return "one_shot", None
    limit = AUTO_ONE_SHOT_MAX_BYTES["cpu" if x.device.type == "cpu" else "cuda"].get(world, 0)
    nbytes = x.numel() * x.element_size()
    if nbytes > limit:
        return "fallback", None  # measured: torch.distributed is faster at this size
    return "one_shot", None


def all_reduce_raw(x: torch.Tensor, group=None, algo: str = "auto") -> torch.Tensor:
    """Sum of ``x`` over ``group`` into a new tensor, no autograd."""
    if algo not in ("auto", "one_shot", "fallback"):
        raise ValueError(f"aiter_dist.all_reduce: algo must be 'auto', 'one_shot' or 'fallback', "
                         f"got {algo!r}")
    _check_all_reduce_input(x)
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        record_path("all_reduce", "identity")
        return x.clone()
    chosen, reason = _pick_algo(x, world, algo)
    if chosen == "one_shot":
        record_path("all_reduce", "one_shot")
        return one_shot_all_reduce_raw(x, group)
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

    Every rank gets bitwise the same result. ``algo`` is ``"auto"``, ``"one_shot"`` or
    ``"fallback"`` (torch.distributed); ``aiter_dist.last_path("all_reduce")`` tells which served.
    """
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return AllReduceFunc.apply(x, group, algo)
    return all_reduce_raw(x, group, algo)  # no graph to record: skip autograd's overhead


def copy_to_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return CopyToParallelRegionFunc.apply(x, group)
