"""The protocol every collective kernel of this package follows, and its error reporting.

A collective is one launch; every rank launches the same grid for the same message. Program ``p``
of each rank:

  1. (program 0) writes this launch's header (elements, dtype, grid, extra) into its buffer;
  2. copies its slices of the input into this rank's workspace buffer (skipped when the input
     already lives there, see ``workspace_tensor``);
  3. meets program ``p`` of every peer at a barrier on channel 0, then (program 0) checks that
     every peer launched the same message;
  4. does the op's work on the peers' buffers;
  5. meets its peers again on channel 1, after which no peer touches this rank's buffer.

Program ``p`` owns the same slices in every step, so a barrier per program is enough: with ``world``
chunks of ``chunk`` elements, program ``p`` owns blocks ``p, p + nprog, ...`` of every chunk.

Each rank issues all collectives of a workspace on one stream (or one captured graph): consecutive
launches are then ordered, which is what lets a program reuse the buffer after its end barrier.

Waits are bounded: a peer that never arrives, or one that launched a different message, is written
into the workspace's error record (host memory), and :func:`check_comm_errors` raises a
``RuntimeError`` naming the op, the group and the rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import FLOAT_DTYPES, check_tensor
from .workspace import ERR_NONE, ERR_TIMEOUT, SIGNAL_CHANNELS

_CHANNELS = tl.constexpr(SIGNAL_CHANNELS)  # epoch counters follow the channels' signal slots

# Op ids kernels write into the error record; each collective file registers its own.
OP_NAMES: dict[int, str] = {}
DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAME = {code: str(dt).replace("torch.", "") for dt, code in DTYPE_CODE.items()}

# Polls per second of a waiting program, used to turn the timeout into a spin bound. The GPU figure
# is about one volatile load of local memory per half microsecond; the interpreter's is measured
# on a 2-core CPU (2000-2500 polls/s with the peer asleep).
_POLLS_PER_S = {"cpu": 2.5e3, "cuda": 2e6}

# AITER_DIST_SYNC_CHECK=1: synchronize after every GPU collective and raise at once on a missing
# peer (debugging); by default the error surfaces at the next collective or check_errors().
SYNC_CHECK = os.environ.get("AITER_DIST_SYNC_CHECK") == "1"


def timeout_s() -> float:
    return float(os.environ.get("AITER_DIST_COMM_TIMEOUT_S", "60"))


def max_spins(device: torch.device) -> int:
    rate = _POLLS_PER_S["cpu" if device.type == "cpu" else "cuda"]
    return min(int(timeout_s() * rate), 2**31 - 1)


# ----------------------------------------------------------------------------- device helpers

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
def _barrier(SIG_PTRS, ERR, channel, rank, world, max_spins, op_id, program,
             MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr):
    """Meet program ``program`` of every peer on ``channel``. Returns 1 if some peer did not come.

    Monotone counters, no resets: a rank signals by adding 1 to its counter in every peer's pad
    (one vector of fire-and-forget atomics, release: the round trips overlap), then waits until
    every peer's counter in its own pad reaches this program's next epoch, and records the
    epoch. A sender never waits for a receiver, and no flag value is ever reused, so a fast
    rank cannot overwrite a signal a slow one has not read. Each wait gives up after
    ``max_spins`` polls and reports the first peer missing.
    """
    peers = tl.arange(0, MAX_WORLD_)
    live = peers < world
    slot = (channel * MAX_PROGRAMS + program) * MAX_WORLD_
    pads = tl.load(SIG_PTRS + peers, mask=live, other=0).to(tl.pointer_type(tl.int32))
    tl.atomic_add(pads + slot + rank, 1, mask=live, sem="release", scope="sys")
    my_pad = tl.load(SIG_PTRS + rank).to(tl.pointer_type(tl.int32))
    epoch_ptr = my_pad + _CHANNELS * MAX_PROGRAMS * MAX_WORLD_ + channel * MAX_PROGRAMS + program
    epoch = tl.load(epoch_ptr) + 1
    # Wait for each peer in turn (the signals travel in parallel, so the total wait is the
    # latest arrival): poll with plain volatile loads, cheap on local memory, then one acquire
    # RMW, which reads the counters' latest values and so synchronizes with every peer's release.
    failed = 0
    for r in range(world):
        seen = tl.load(my_pad + slot + r, volatile=True)
        spins = 1
        while (seen - epoch < 0) & (spins < max_spins) & (failed == 0):
            seen = tl.load(my_pad + slot + r, volatile=True)
            spins += 1
        if (seen - epoch < 0) & (failed == 0):  # differences: counters may wrap around
            failed = 1
            _report(ERR, 1, op_id, r, program, 0, 0, 0, 0)
    if failed == 0:
        tl.atomic_add(my_pad + slot + peers, 0, mask=live, sem="acquire", scope="sys")
        tl.store(epoch_ptr, epoch)
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
def _check_headers(BUF_PTRS, world, numel, dtype_code, nprog, extra):
    """The first peer whose launch header differs from this rank's (-1: none), with its element
    count and dtype code, for the error report."""
    bad = tl.full((), -1, tl.int32)
    bad_numel = tl.full((), 0, tl.int64)
    bad_dtype = tl.full((), 0, tl.int64)
    for r in range(world):
        peer = tl.load(BUF_PTRS + r).to(tl.pointer_type(tl.int64))
        p_numel = tl.load(peer, volatile=True)
        p_dtype = tl.load(peer + 1, volatile=True)
        p_nprog = tl.load(peer + 2, volatile=True)
        p_extra = tl.load(peer + 3, volatile=True)
        differs = (p_numel != numel) | (p_dtype != dtype_code) | (p_nprog != nprog) | \
            (p_extra != extra)
        first = differs & (bad < 0)
        bad = tl.where(first, r, bad)
        bad_numel = tl.where(first, p_numel, bad_numel)
        bad_dtype = tl.where(first, p_dtype, bad_dtype)
    return bad, bad_numel, bad_dtype


@triton.jit
def _peer_buf(BUF_PTRS, r, elem_ty, HEADER: tl.constexpr):
    """Rank ``r``'s data region, typed; 16-byte aligned so loads can be vectorized."""
    return tl.multiple_of((tl.load(BUF_PTRS + r) + HEADER).to(tl.pointer_type(elem_ty)), 16)


@triton.jit
def _meet(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, channel,
          MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr):
    """Barrier of this program with program ``pid`` of every peer on ``channel``. Syncs the program
    before (all its writes precede the signal) and after (all its threads see the peers')."""
    pid = tl.program_id(0)
    tl.debug_barrier()
    failed = _barrier(SIG_PTRS, ERR, channel, rank, world, max_spins, op_id, pid,
                      MAX_PROGRAMS, MAX_WORLD_)
    tl.debug_barrier()
    return failed


@triton.jit
def _start(IN, BUF_PTRS, SIG_PTRS, ERR, n_in, chunk, n_chunks, header_numel, extra,
           rank, world, max_spins, dtype_code, op_id,
           COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr,
           HEADER: tl.constexpr, BLOCK: tl.constexpr):
    """Steps 1-3: header, copy in (``n_chunks`` chunks of ``chunk`` elements, ``n_in`` in all),
    start barrier, and (program 0) the peers' headers. Returns ``(failed, bad, bad_numel,
    bad_dtype)``: failed is 1 if a peer is missing (skip the work); the first peer whose header
    differs (-1: none) goes to ``_report_mismatch`` after the work, so the header loads overlap
    the work instead of delaying it."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    my_base = tl.load(BUF_PTRS + rank)
    extra = extra * 16 + op_id  # the op too: two ops can launch identical shapes
    if pid == 0:
        _write_header(my_base, header_numel, dtype_code, nprog, extra)
    if COPY_IN:
        my_buf = _peer_buf(BUF_PTRS, rank, IN.dtype.element_ty, HEADER)
        offs0 = tl.arange(0, BLOCK)
        for c in range(n_chunks):
            for start in range(pid * BLOCK, chunk, nprog * BLOCK):
                offs = c * chunk + start + offs0
                mask = (start + offs0 < chunk) & (offs < n_in)
                tl.store(my_buf + offs, tl.load(IN + offs, mask=mask), mask=mask)
    failed = _meet(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, 0,
                   MAX_PROGRAMS, MAX_WORLD_)
    # Peers wrote their headers before signalling program 0. Different sizes usually also mean
    # different grids, so one rank's surplus programs time out, but only after the full wait:
    # program 0 records the mismatch long before.
    bad = tl.full((), -1, tl.int32)
    bad_numel = tl.full((), 0, tl.int64)
    bad_dtype = tl.full((), 0, tl.int64)
    if (pid == 0) & (failed == 0):
        bad, bad_numel, bad_dtype = _check_headers(BUF_PTRS, world, header_numel, dtype_code,
                                                   nprog, extra)
    return failed, bad, bad_numel, bad_dtype


@triton.jit
def _report_mismatch(ERR, op_id, bad, bad_numel, bad_dtype, my_numel, my_dtype):
    if bad >= 0:
        _report(ERR, 2, op_id, bad, 0, bad_numel, bad_dtype, my_numel, my_dtype)


@triton.jit
def _finish(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, failed,
            MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr):
    """Step 5: end barrier (channel 1): no peer reads this rank's buffer any more."""
    if failed == 0:
        failed = _meet(BUF_PTRS, SIG_PTRS, ERR, rank, world, max_spins, op_id, 1,
                       MAX_PROGRAMS, MAX_WORLD_)
    return failed


# ----------------------------------------------------------------------------- host side

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
               f"{timeout_s():.0f} s (program {f[3]}); check that every rank of the group calls "
               f"the same collectives in the same order (AITER_DIST_COMM_TIMEOUT_S sets the wait)")
    else:
        msg = (f"aiter_dist.{op}: rank {f[2]} of {ws.describe()} launched a different message "
               f"({f[4]} elements of {_DTYPE_NAME.get(f[5], f[5])}) than this rank ({f[6]} "
               f"elements of {_DTYPE_NAME.get(f[7], f[7])}); every rank must pass tensors of the "
               f"same shape and dtype")
        if f[4:6] == f[6:8]:
            msg += (" and the same algo (the sizes agree: the algorithm, row width or op differs; "
                    "pass the same algo= on every rank)")
    ws.broken = msg
    raise RuntimeError(msg)


def after_launch(ws, device: torch.device) -> None:
    """On CPU the launch has finished: raise now. On GPU only with AITER_DIST_SYNC_CHECK=1."""
    if device.type == "cpu":
        check_comm_errors(ws)
    elif SYNC_CHECK:
        torch.cuda.current_stream(device).synchronize()
        check_comm_errors(ws)


def check_comm_input(op: str, name: str, x, ndim_min: int = 0) -> None:
    """dtype, and the device: a CUDA tensor must be on this rank's current device, where the
    group's workspace lives (a tensor elsewhere would make a workspace the peers never join)."""
    check_tensor(op, name, x, dtypes=FLOAT_DTYPES, ndim_min=ndim_min)
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        raise ValueError(f"aiter_dist.{op}: {name} is on {x.device} but this rank's device is "
                         f"cuda:{torch.cuda.current_device()}; move it there or call "
                         f"torch.cuda.set_device() (aiter_dist.init_distributed() does)")


def resolve_group(group):
    return group if group is not None else dist.group.WORLD


def auto_table(device: torch.device) -> str:
    """Which row of a measured threshold table applies to a call on ``device`` right now."""
    if device.type == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_current_stream_capturing() else "cuda-eager"
