"""All-reduce (sum) over the symmetric workspace, with torch.distributed as the fallback.

One-shot algorithm, one launch (every rank launches the same grid for the same message):
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
from .workspace import ERR_NONE, ERR_TIMEOUT, HEADER_BYTES, MAX_WORLD, get_workspace

OP_ALL_REDUCE = 1
# Op ids kernels write into the error record; other collective files register theirs here.
OP_NAMES = {OP_ALL_REDUCE: "all_reduce"}
_DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}

# Largest message (bytes) that algo="auto" sends through the one-shot kernel, by device type and
# world size; larger ones go to torch.distributed. "cuda" applies while a CUDA graph is being
# captured; "cuda-eager" to eager calls, where each call pays the Python launch cost.
# cuda: benchmarks/results/h200.md (bench_allreduce.py, 2x H200, bf16, CUDA-graph replay): the
#   one-shot kernel beats NCCL 1.16-1.30x from 4 KB to 4 MB, and loses from 16 MB (113 vs 75 us).
#   Other world sizes have not been measured: they use the same threshold until runs on 4 and 8
#   GPUs retune it.
# cpu: the CPU backend exists so the real kernels run in CI and in CPU training; gloo is faster
#   there, but small messages take the kernel so that CPU runs exercise it.
AUTO_ONE_SHOT_MAX_BYTES = {
    "cuda": {w: 4 << 20 for w in range(2, MAX_WORLD + 1)},
    # Eager, 2x H200: the kernel costs ~40 us of host time per call against NCCL's ~22-25 us up to
    # 1 MB, and ties at 4 MB (38.8 vs 39.2 us): NCCL serves eager calls until launch gets cheaper.
    "cuda-eager": {w: 0 for w in range(2, MAX_WORLD + 1)},
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


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _report(ERR, code, op_id, peer, program, peer_total, peer_dtype, my_total, my_dtype):
    """Record the first error of a launch (later ones keep the first); the host reads it."""
    if tl.atomic_cas(ERR, 0, code, sem="acq_rel", scope="sys") == 0:
        tl.store(ERR + 1, op_id)
        tl.store(ERR + 2, peer)
        tl.store(ERR + 3, program)
        tl.store(ERR + 4, peer_total)
        tl.store(ERR + 5, peer_dtype)
        tl.store(ERR + 6, my_total)
        tl.store(ERR + 7, my_dtype)


@triton.jit
def _barrier(SIG_PTRS, ERR, slot_base, rank, world, max_spins, op_id, program):
    """Signal every peer's slot ``slot_base + rank``, then wait for every peer in this rank's slots.

    Flags reset themselves: the sender waits for 0 and writes 1 (release), the receiver waits for
    1 and writes 0 (acquire). Each wait gives up after ``max_spins`` polls and reports the peer.
    Returns 1 if some peer did not arrive.
    """
    failed = 0
    for r in range(world):
        slot = tl.load(SIG_PTRS + r).to(tl.pointer_type(tl.int32)) + slot_base + rank
        prev = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
        spins = 1
        while (prev != 0) & (spins < max_spins):
            prev = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
            spins += 1
        if (prev != 0) & (failed == 0):
            failed = 1
            _report(ERR, 1, op_id, r, program, 0, 0, 0, 0)
    if failed == 0:
        my_sig = tl.load(SIG_PTRS + rank).to(tl.pointer_type(tl.int32)) + slot_base
        for r in range(world):
            prev = tl.atomic_cas(my_sig + r, 1, 0, sem="acquire", scope="sys")
            spins = 1
            while (prev != 1) & (spins < max_spins):
                prev = tl.atomic_cas(my_sig + r, 1, 0, sem="acquire", scope="sys")
                spins += 1
            if (prev != 1) & (failed == 0):
                failed = 1
                _report(ERR, 1, op_id, r, program, 0, 0, 0, 0)
    return failed


@triton.jit
def _write_header(base, numel, dtype_code, nprog, extra):
    """This launch's header at the start of this rank's buffer, for the peers to check."""
    hdr = base.to(tl.pointer_type(tl.int64))
    tl.store(hdr, numel)
    tl.store(hdr + 1, dtype_code)
    tl.store(hdr + 2, nprog)
    tl.store(hdr + 3, extra)


@triton.jit
def _check_headers(BUF_PTRS, ERR, world, numel, dtype_code, nprog, extra, op_id, program):
    """Report the first peer whose header differs from this rank's (after the start barrier)."""
    for r in range(world):
        peer = tl.load(BUF_PTRS + r).to(tl.pointer_type(tl.int64))
        p_numel = tl.load(peer, volatile=True)
        p_dtype = tl.load(peer + 1, volatile=True)
        p_nprog = tl.load(peer + 2, volatile=True)
        p_extra = tl.load(peer + 3, volatile=True)
        if (p_numel != numel) | (p_dtype != dtype_code) | (p_nprog != nprog) | (p_extra != extra):
            _report(ERR, 2, op_id, r, program, p_numel, p_dtype, numel, dtype_code)


# Rank-like ints are not specialized: a value of 1 (rank 1, dtype code 1) would otherwise become a
# compile-time constant and a different kernel per rank. numel stays specialized: knowing it is a
# multiple of 16 is what lets the masked loads be 16 bytes wide (3x at 4 MB on H200).
@triton.jit(do_not_specialize=["total", "rank", "world", "max_spins", "dtype_code", "op_id"])
def _one_shot_all_reduce_kernel(
    IN, OUT, BUF_PTRS, SIG_PTRS, ERR,
    numel, total, rank, world, max_spins, dtype_code, op_id,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = IN.dtype.element_ty
    offs0 = tl.arange(0, BLOCK)
    my_base = tl.load(BUF_PTRS + rank)
    my_buf = tl.multiple_of((my_base + HEADER).to(tl.pointer_type(elem_ty)), 16)

    # 1. Copy in; program 0 also writes this launch's header for the peers to check.
    if pid == 0:
        _write_header(my_base, numel, dtype_code, nprog, total)
    for start in range(pid * BLOCK, numel, nprog * BLOCK):
        offs = start + offs0
        mask = offs < numel
        tl.store(my_buf + offs, tl.load(IN + offs, mask=mask), mask=mask)

    # 2. Start barrier (channel 0). Sync the program first: one thread signals for all of them.
    tl.debug_barrier()
    failed = _barrier(SIG_PTRS, ERR, pid * MAX_WORLD_, rank, world, max_spins, op_id, pid)
    tl.debug_barrier()

    # Every peer must have launched the same message (program 0 exists on every rank and its peers
    # wrote their headers before signalling it). Different sizes also mean different grids, so
    # the surplus programs of one rank time out; the first error recorded is this one.
    if (pid == 0) & (failed == 0):
        _check_headers(BUF_PTRS, ERR, world, numel, dtype_code, nprog, total, op_id, pid)

    # 3. Reduce in rank order, fp32 accumulation.
    if failed == 0:
        for start in range(pid * BLOCK, numel, nprog * BLOCK):
            offs = start + offs0
            mask = offs < numel
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in range(world):
                src = tl.multiple_of((tl.load(BUF_PTRS + r) + HEADER).to(tl.pointer_type(elem_ty)), 16)
                acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)

    # 4. End barrier (channel 1): peers are done reading this rank's buffer.
    tl.debug_barrier()
    if failed == 0:
        _barrier(SIG_PTRS, ERR, (MAX_PROGRAMS + pid) * MAX_WORLD_, rank, world, max_spins, op_id,
                 pid)


# ----------------------------------------------------------------------------- launchers

_DTYPE_NAME = {code: str(dt).replace("torch.", "") for dt, code in _DTYPE_CODE.items()}


def check_comm_errors(ws) -> None:
    """Raise if a kernel on ``ws`` reported a missing or mismatched peer (reads host memory).

    After an error the workspace's flags may be mid-handshake: it stays unusable until every rank
    calls ``aiter_dist.comm.release_workspaces()`` (the next collective then makes a new one).
    """
    if ws.broken:
        raise RuntimeError(f"aiter_dist: the workspace of {ws.describe()} is unusable after an "
                           f"earlier error ({ws.broken}); call aiter_dist.comm.release_workspaces() "
                           f"on every rank of the group, then retry")
    code = int(ws.err_host[0])  # numpy view of the record: no tensor op on the hot path
    if code == ERR_NONE:
        return
    f = ws.err.tolist()
    op = OP_NAMES.get(f[1], f"op {f[1]}")
    if code == ERR_TIMEOUT:
        msg = (f"aiter_dist.{op}: rank {f[2]} of {ws.describe()} did not arrive within about "
               f"{_timeout_s():.0f} s (program {f[3]}); check that every rank of the group calls "
               f"the same collectives in the same order (AITER_DIST_COMM_TIMEOUT_S sets the wait)")
    else:
        msg = (f"aiter_dist.{op}: rank {f[2]} of {ws.describe()} launched a different message "
               f"({f[4]} elements of {_DTYPE_NAME.get(f[5], f[5])}) than this rank ({f[6]} "
               f"elements of {_DTYPE_NAME.get(f[7], f[7])}); every rank must pass tensors of the "
               f"same shape and dtype")
    ws.broken = msg
    raise RuntimeError(msg)


def _check_all_reduce_input(x):
    check_tensor("all_reduce", "x", x, dtypes=FLOAT_DTYPES, ndim_min=0)
    if not x.is_contiguous():
        raise ValueError(f"aiter_dist.all_reduce: x must be contiguous (strides {x.stride()}); "
                         f"call .contiguous() first")


def one_shot_all_reduce_raw(x: torch.Tensor, group=None):
    """The one-shot kernel, no autograd. Messages larger than the workspace go in pieces."""
    _check_all_reduce_input(x)
    ws = get_workspace(group, x.device)
    check_comm_errors(ws)
    out = torch.empty_like(x)
    xf, of = x.view(-1), out.view(-1)
    cpu = x.device.type == "cpu"
    cap = (ws.data_bytes // x.element_size()) // 64 * 64
    # The interpreter runs each block op as one numpy call: large blocks, few iterations.
    block = 16384 if cpu else 2048
    max_spins = min(int(_timeout_s() * _POLLS_PER_S["cpu" if cpu else "cuda"]), 2**31 - 1)
    for start in range(0, xf.numel(), cap):
        n = min(cap, xf.numel() - start)
        src, dst = (xf, of) if n == xf.numel() else (xf[start:start + n], of[start:start + n])
        programs = min(triton.cdiv(n, block), ws.max_programs)
        launch(_one_shot_all_reduce_kernel, (programs,), x.device,
               src, dst, ws.buffer_ptrs, ws.signal_ptrs, ws.err,
               n, min(xf.numel(), 2**31 - 1), ws.rank, ws.world_size, max_spins,
               _DTYPE_CODE[x.dtype], OP_ALL_REDUCE,
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
    if x.device.type == "cpu":
        table = "cpu"
    else:
        table = "cuda" if torch.cuda.is_current_stream_capturing() else "cuda-eager"
    limit = AUTO_ONE_SHOT_MAX_BYTES[table].get(world, 0)
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
