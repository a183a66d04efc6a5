"""The protocol every collective kernel of this package follows, its host-side launch, and its
error reporting.

A collective is one launch per piece of the message; every rank launches the same grid for the
same message. Program ``p`` of each rank:

  1. (program 0) writes this launch's header (see :class:`Header`) into its buffer;
  2. copies its slices of the input into this rank's workspace buffer (skipped when the input
     already lives there, see ``workspace_tensor``);
  3. meets program ``p`` of every peer at a barrier on channel 0, then (program 0) checks that
     every peer launched the same header;
  4. does the op's work on the peers' buffers;
  5. meets its peers again on channel 1, after which no peer touches this rank's buffer.

Program ``p`` owns the same slices in every step, so a barrier per program is enough: with ``world``
chunks of ``chunk`` elements, program ``p`` owns blocks ``p, p + nprog, ...`` of every chunk.

Each rank issues all collectives of a workspace on one stream (or one captured graph): consecutive
launches are then ordered, which is what lets a program reuse the buffer after its end barrier.

Waits are bounded and abortable. A peer that never arrives, or one that launched a different
header, is written into the workspace's error record (host memory) and poisons the workspace on
every rank, so every other waiting program gives up at once; :func:`check_comm_errors` raises a
``RuntimeError`` naming the op, the group, the rank and both sides' messages.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import (FLOAT_DTYPES, _current_device, check_tensor, launch, plan_of,
                                record_path, spec_int, spec_tensor)
from .workspace import (CTL_SEQ, ERR_CODE, ERR_MISMATCH, ERR_MY_HEADER, ERR_NONE, ERR_OP, ERR_PEER,
                        ERR_PEER_EXITED, ERR_PEER_FAILED, ERR_PEER_HEADER, ERR_PROGRAM,
                        ERR_TIMEOUT, HEADER_BYTES, HEADER_WORDS, MAX_WORLD, SIGNAL_CHANNELS)

_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                     lambda: torch.cuda.is_current_stream_capturing())

# Op ids kernels write into headers and error records; each collective file registers its own.
OP_NAMES: dict[int, str] = {}
DTYPE_CODE = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAME = {code: str(dt).replace("torch.", "") for dt, code in DTYPE_CODE.items()}
# Header.variant of a call that goes to torch.distributed: never equal to a kernel's variant.
VARIANT_FALLBACK = 1 << 30

# Polls per second of a waiting program, used to turn the timeout into a spin bound on GPUs (about
# one volatile load of local memory per half microsecond). On CPU the watchdog thread enforces
# the timeout by the clock; the spin bound there is only a backstop.
_POLLS_PER_S = {"cpu": 1e4, "cuda": 2e6}
# How often a spinning program also reads the host's abort word (a PCIe read on GPUs).
_ABORT_POLL = {"cpu": 1, "cuda": 64}

# AITER_DIST_SYNC_CHECK=1: synchronize after every GPU collective and raise at once on a missing
# peer (debugging); by default the error surfaces at the next collective or check_errors().
SYNC_CHECK = os.environ.get("AITER_DIST_SYNC_CHECK") == "1"


# AITER_DIST_COMM_TIMEOUT_S: read at import and again when a group's state is set up (a script may
# set it after importing aiter_dist), never per call (a microsecond a call).
_TIMEOUT_S = float(os.environ.get("AITER_DIST_COMM_TIMEOUT_S", "60"))


def timeout_s() -> float:
    return _TIMEOUT_S


def read_timeout_env() -> None:
    global _TIMEOUT_S
    _TIMEOUT_S = float(os.environ.get("AITER_DIST_COMM_TIMEOUT_S", "60"))


def max_spins(device: torch.device) -> int:
    rate = _POLLS_PER_S["cpu" if device.type == "cpu" else "cuda"]
    return min(int(_TIMEOUT_S * rate), 2**31 - 1)


class Header(NamedTuple):
    """A launch header: what every rank checks its peers launched. Eight int64 words, written by
    program 0 at the start of the rank's buffer and copied into error records."""
    seq: int  # the group's call counter: ranks that skipped a call differ here
    op: int  # OP_NAMES id
    dtype: int  # DTYPE_CODE
    numel: int  # elements of this launch (a piece of the message)
    total: int  # elements of the whole message (low 31 bits)
    key: int  # the caller's shape (31-bit hash) and dim: same numel, different layout differs
    variant: int  # the op's algorithm or mode, the piece index; VARIANT_FALLBACK for NCCL/gloo
    nprog: int  # programs of the launch


def shape_key(shape, dim: int = 0) -> int:
    """31 bits that differ (almost always) when the shapes or the dim differ (a torch.Size
    hashes as the tuple it is)."""
    return hash((shape, dim)) & 0x7FFFFFFF


def _describe(h) -> str:
    op = OP_NAMES.get(int(h[1]), f"op {int(h[1])}")
    where = "torch.distributed" if int(h[6]) & VARIANT_FALLBACK else "the kernel"
    return (f"{op} of {int(h[4])} elements of {_DTYPE_NAME.get(int(h[2]), int(h[2]))} "
            f"(call #{int(h[0])}, {where})")


# ----------------------------------------------------------------------------- device helpers

_CHANNELS = tl.constexpr(SIGNAL_CHANNELS)


@triton.jit
def _report(ERR, SIG_PTRS, BUF_PTRS, rank, world, code, op_id, peer, program,
            POISON: tl.constexpr, MAX_WORLD_: tl.constexpr, WITH_PEER_HEADER: tl.constexpr,
            HWORDS: tl.constexpr):
    """Record the first error of the workspace (later ones keep it) and poison the workspace here
    and on every peer. The first-wins test is an atomic on device memory (the lock word after the
    poison word); the record goes to host memory, its code last."""
    my_pad = tl.load(SIG_PTRS + rank).to(tl.pointer_type(tl.int32))
    if tl.atomic_cas(my_pad + POISON + 1, 0, 1, sem="acq_rel", scope="gpu") == 0:
        words = tl.arange(0, HWORDS)
        mine = tl.load(BUF_PTRS + rank).to(tl.pointer_type(tl.int64))
        tl.store(ERR + 12 + words, tl.load(mine + words, volatile=True))
        if WITH_PEER_HEADER:
            theirs = tl.load(BUF_PTRS + peer).to(tl.pointer_type(tl.int64))
            tl.store(ERR + 4 + words, tl.load(theirs + words, volatile=True))
        tl.store(ERR + 1, op_id)
        tl.store(ERR + 2, peer)
        tl.store(ERR + 3, program)
        tl.store(ERR, code)
        # Every waiting program, here and on the peers, sees a poison word and gives up instead
        # of timing out. A poison word keeps its first value (it names the first reporter).
        tl.atomic_cas(my_pad + POISON, 0, code * 16 + rank, sem="release", scope="sys")
        for r in range(world):
            if r != rank:
                pad = tl.load(SIG_PTRS + r).to(tl.pointer_type(tl.int32))
                tl.atomic_cas(pad + POISON, 0, code * 16 + rank, sem="release", scope="sys")


@triton.jit
def _barrier(SIG_PTRS, BUF_PTRS, ERR, channel, rank, world, max_spins, op_id, program,
             MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, ABORT_POLL: tl.constexpr,
             HWORDS: tl.constexpr):
    """Meet program ``program`` of every peer on ``channel``. Returns 1 if the meeting failed.

    Monotone counters, no resets: a rank signals by adding 1 to its counter in every peer's pad
    (one vector of fire-and-forget atomics, release: the round trips overlap), then waits until
    every peer's counter in its own pad reaches this program's next epoch, and records the
    epoch. A sender never waits for a receiver, and no flag value is ever reused, so a fast
    rank cannot overwrite a signal a slow one has not read.

    Threads poll on their own (volatile loads: cheap, and they may see an arrival at different
    moments), stopping at an arrival, a poisoned workspace, the host's abort word or the spin
    bound. The outcome is then decided once for the whole program from one acquire read of every
    counter and the poison word (reductions: the same value in every thread), so every thread
    takes the same branch.
    """
    POISON: tl.constexpr = _CHANNELS * MAX_PROGRAMS * (MAX_WORLD_ + 1)
    peers = tl.arange(0, MAX_WORLD_)
    live = peers < world
    slot = (channel * MAX_PROGRAMS + program) * MAX_WORLD_
    pads = tl.load(SIG_PTRS + peers, mask=live, other=0).to(tl.pointer_type(tl.int32))
    tl.atomic_add(pads + slot + rank, 1, mask=live, sem="release", scope="sys")
    my_pad = tl.load(SIG_PTRS + rank).to(tl.pointer_type(tl.int32))
    epoch_ptr = my_pad + _CHANNELS * MAX_PROGRAMS * MAX_WORLD_ + channel * MAX_PROGRAMS + program
    epoch = tl.load(epoch_ptr) + 1
    for r in range(world):
        seen = tl.load(my_pad + slot + r, volatile=True)
        spins = 1
        stop = 0
        while (seen - epoch < 0) & (stop == 0):  # differences: counters may wrap around
            seen = tl.load(my_pad + slot + r, volatile=True)
            spins += 1
            if spins % ABORT_POLL == 0:
                stop = tl.load(my_pad + POISON, volatile=True) | (spins >= max_spins).to(tl.int32)
                stop = stop | tl.load(ERR + 20, volatile=True).to(tl.int32)
    tl.debug_barrier()
    lanes = tl.arange(0, 2 * MAX_WORLD_)
    is_poison = lanes == 2 * MAX_WORLD_ - 1
    ptrs = tl.where(is_poison, my_pad + POISON, my_pad + slot + lanes)
    vals = tl.atomic_add(ptrs, 0, mask=(lanes < world) | is_poison, sem="acquire", scope="sys")
    short = (lanes < world) & (vals - epoch < 0)
    missing = tl.min(tl.where(short, lanes, MAX_WORLD_), axis=0)
    poison = tl.max(tl.where(is_poison, vals, 0), axis=0)
    failed = ((missing < world) | (poison != 0)).to(tl.int32)
    if failed == 0:
        tl.store(epoch_ptr, epoch)
    elif poison != 0:
        if poison % 16 != rank:  # a peer failed first: record it (with both headers) here too
            _report(ERR, SIG_PTRS, BUF_PTRS, rank, world, 4, op_id, poison % 16, program,
                    POISON, MAX_WORLD_, True, HWORDS)
    elif tl.load(ERR + 20, volatile=True) == 2:
        _report(ERR, SIG_PTRS, BUF_PTRS, rank, world, 3, op_id,
                tl.load(ERR + 21, volatile=True).to(tl.int32), program, POISON, MAX_WORLD_,
                False, HWORDS)
    else:
        _report(ERR, SIG_PTRS, BUF_PTRS, rank, world, 1, op_id, missing, program, POISON,
                MAX_WORLD_, False, HWORDS)
    return failed


@triton.jit
def _write_header(BUF_PTRS, rank, seq, op_id, dtype_code, numel, total, key, variant):
    """This launch's header (:class:`Header`) at the start of this rank's buffer (stores cast
    to int64)."""
    hdr = tl.load(BUF_PTRS + rank).to(tl.pointer_type(tl.int64))
    tl.store(hdr, seq)
    tl.store(hdr + 1, op_id)
    tl.store(hdr + 2, dtype_code)
    tl.store(hdr + 3, numel)
    tl.store(hdr + 4, total)
    tl.store(hdr + 5, key)
    tl.store(hdr + 6, variant)
    tl.store(hdr + 7, tl.num_programs(0))


@triton.jit
def _first_mismatch(BUF_PTRS, rank, world, HWORDS: tl.constexpr):
    """The first peer whose launch header differs from this rank's (-1: none)."""
    words = tl.arange(0, HWORDS)
    mine = tl.load(tl.load(BUF_PTRS + rank).to(tl.pointer_type(tl.int64)) + words)
    bad = tl.full((), -1, tl.int32)
    for r in range(world):
        theirs = tl.load(tl.load(BUF_PTRS + r).to(tl.pointer_type(tl.int64)) + words,
                         volatile=True)
        differs = tl.max((theirs != mine).to(tl.int32), axis=0)
        bad = tl.where((differs != 0) & (bad < 0), r, bad)
    return bad


@triton.jit
def _peer_buf(BUF_PTRS, r, elem_ty, HEADER: tl.constexpr):
    """Rank ``r``'s data region, typed; 16-byte aligned so loads can be vectorized."""
    return tl.multiple_of((tl.load(BUF_PTRS + r) + HEADER).to(tl.pointer_type(elem_ty)), 16)


@triton.jit
def _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, channel,
          MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, ABORT_POLL: tl.constexpr,
          HWORDS: tl.constexpr):
    """Barrier of this program with program ``pid`` of every peer on ``channel``. Syncs the program
    before (all its writes precede the signal) and after (all its threads see the peers')."""
    tl.debug_barrier()
    failed = _barrier(SIG_PTRS, BUF_PTRS, ERR, channel, rank, world, max_spins, op_id,
                      tl.program_id(0), MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)
    tl.debug_barrier()
    return failed


@triton.jit
def _start(IN, BUF_PTRS, SIG_PTRS, ERR, n_in, chunk, n_chunks,
           seq, op_id, dtype_code, numel, total, key, variant, rank, world, max_spins,
           COPY_IN: tl.constexpr, MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr,
           HEADER: tl.constexpr, ABORT_POLL: tl.constexpr, HWORDS: tl.constexpr,
           BLOCK: tl.constexpr):
    """Steps 1-3: header, copy in (``n_chunks`` chunks of ``chunk`` elements, ``n_in`` in all),
    start barrier, and (program 0) the peers' headers. Returns ``(failed, bad)``: failed is 1 if
    the meeting failed (skip the work); ``bad`` is the first peer whose header differs (-1: none),
    reported by ``_report_mismatch`` after the work, so the header loads overlap the work."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if pid == 0:
        _write_header(BUF_PTRS, rank, seq, op_id, dtype_code, numel, total, key, variant)
    if COPY_IN:
        my_buf = _peer_buf(BUF_PTRS, rank, IN.dtype.element_ty, HEADER)
        offs0 = tl.arange(0, BLOCK)
        for c in range(n_chunks):
            for start in range(pid * BLOCK, chunk, nprog * BLOCK):
                offs = c * chunk + start + offs0
                mask = (start + offs0 < chunk) & (offs < n_in)
                tl.store(my_buf + offs, tl.load(IN + offs, mask=mask), mask=mask)
    failed = _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, 0,
                   MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)
    # Peers wrote their headers before program 0 signalled. Different messages usually also
    # mean different grids: the surplus programs of one rank then wait until the report below
    # poisons the workspace, not for the full timeout.
    bad = tl.full((), -1, tl.int32)
    if (pid == 0) & (failed == 0):
        bad = _first_mismatch(BUF_PTRS, rank, world, HWORDS)
    return failed, bad


@triton.jit
def _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad,
                     MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HWORDS: tl.constexpr):
    if bad >= 0:
        _report(ERR, SIG_PTRS, BUF_PTRS, rank, world, 2, op_id, bad, 0,
                _CHANNELS * MAX_PROGRAMS * (MAX_WORLD_ + 1), MAX_WORLD_, True, HWORDS)


@triton.jit
def _finish(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, failed,
            MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, ABORT_POLL: tl.constexpr,
            HWORDS: tl.constexpr):
    """Step 5: end barrier (channel 1): no peer reads this rank's buffer any more."""
    if failed == 0:
        failed = _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, 1,
                       MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)
    return failed


# Rank-like ints are not specialized: a value of 1 (rank 1, dtype code 1) would otherwise become
# a compile-time constant and a different kernel per rank.
@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "numel", "total", "key", "variant",
                               "rank", "world", "max_spins"])
def _handshake_kernel(BUF_PTRS, SIG_PTRS, ERR, seq, op_id, dtype_code, numel, total, key, variant,
                      rank, world, max_spins, MAX_PROGRAMS: tl.constexpr,
                      MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr, ABORT_POLL: tl.constexpr,
                      HWORDS: tl.constexpr):
    # A rank whose call goes to torch.distributed while a peer's went to a kernel announces its
    # own header here, so the peer's kernel sees the difference instead of waiting out the timeout.
    failed, bad = _start(ERR, BUF_PTRS, SIG_PTRS, ERR, 0, 0, 0, seq, op_id, dtype_code, numel,
                         total, key, variant, rank, world, max_spins, False, MAX_PROGRAMS,
                         MAX_WORLD_, HEADER, ABORT_POLL, HWORDS, 16)
    _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad, MAX_PROGRAMS, MAX_WORLD_,
                     HWORDS)
    _finish(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, failed, MAX_PROGRAMS,
            MAX_WORLD_, ABORT_POLL, HWORDS)


# ----------------------------------------------------------------------------- host side

class Call(NamedTuple):
    """One collective call as its launches describe it (the Header fields but numel and nprog)."""
    seq: int
    op: int
    dtype: int
    total: int
    key: int


def protocol_meta(ws) -> dict:
    """The constexprs every protocol kernel takes, for ``ws``."""
    dev = "cpu" if ws.device.type == "cpu" else "cuda"
    return dict(MAX_PROGRAMS=ws.max_programs, MAX_WORLD_=MAX_WORLD, HEADER=HEADER_BYTES,
                ABORT_POLL=_ABORT_POLL[dev], HWORDS=HEADER_WORDS)


def launch_collective(kernel, programs: int, ws, call: Call, numel: int, variant: int,
                      tensors=(), scalars=(), plan=None, **meta):
    """Launch one piece of ``call``: ``kernel(*tensors, <protocol arguments>, *scalars, **meta)``
    on ``programs`` programs, the protocol arguments being the pointer tables, the error record,
    the header fields (seq, op, dtype, numel, total, key, variant), rank, world and the spin
    bound, followed by the protocol's constexprs. On CPU it raises at once if the call failed.

    The launch key names only what varies between calls (the tensors, numel and the scalars,
    which Triton specializes on); the header fields, rank and world are never specialized, the
    pointer tables and record are the workspace's, the spin bound is fixed. ``plan``: the
    (op, path) a :class:`CollectivePlan` repeating this launch records; it is returned (None
    when a tensor is not 16-byte aligned)."""
    check_comm_errors(ws)
    device = ws.device
    common = getattr(ws, "launch_meta", None)
    if common is None:
        common = ws.launch_meta = protocol_meta(ws)
    args = (*tensors, ws.buffer_ptrs, ws.signal_ptrs, ws.err, call.seq, call.op, call.dtype,
            numel, call.total, call.key, variant, ws.rank, ws.world_size, max_spins(device),
            *scalars)
    key = None
    if device.type != "cpu":
        key = (ws.max_programs, tuple(map(spec_tensor, tensors)), spec_int(numel),
               tuple(spec_int(v) if type(v) is int else type(v) for v in scalars),
               tuple(meta.items()))
    _guarded(ws, launch, kernel, (programs,), device, *args, launch_key=key, **common, **meta)
    if plan is None:
        return None
    lp = plan_of(kernel, (programs,), device, args, {**common, **meta}, key)
    return None if lp is None else CollectivePlan(ws, *plan, lp, args, len(tensors))


def _guarded(ws, launch_fn, *args, **kwargs) -> None:
    """``launch_fn(*args, **kwargs)`` under the protocol's checks: on GPU, with SYNC_CHECK, a
    synchronize and the error check; on CPU, the watchdog's deadline around it (it enforces the
    CPU timeout) and the error check after, which raises at once if the call failed."""
    if ws.device.type != "cpu":
        launch_fn(*args, **kwargs)
        if SYNC_CHECK:
            torch.cuda.current_stream(ws.device).synchronize()
            check_comm_errors(ws)
        return
    ws.set_deadline(time.monotonic() + _TIMEOUT_S)
    try:
        launch_fn(*args, **kwargs)
    finally:
        ws.set_deadline(0.0)
    check_comm_errors(ws)


# ----------------------------------------------------------------------------- launch plans
#
# An eager collective's host path (checks, routing, the workspace lookup, the launch key) costs
# several times the kernel launch itself. A call whose message takes one kernel launch keeps a
# CollectivePlan under its signature (shape, strides, dtype, device, group, algo, the capture
# state that picks the auto row): the routed path, the workspace and the launch with every int
# but seq fixed. A later call of that signature bumps the group's counter and launches.

class CollectivePlan:
    """One call signature's routed, single-launch kernel path (see above). ``extra``: what the
    op keeps beside it (output shapes)."""
    __slots__ = ("st", "ws", "op", "path", "launch", "ints", "ctl_row", "gpu", "extra")

    def __init__(self, ws, op: str, path: str, launch_plan, args, n_tensors: int):
        st = ws.state
        self.st, self.ws, self.op, self.path, self.launch = st, ws, op, path, launch_plan
        # args: (*tensors, buffer_ptrs, signal_ptrs, err, seq, op .. world, max_spins, *scalars)
        head = args[n_tensors:n_tensors + 3]
        self.ints = (head, args[n_tensors + 4:n_tensors + 12], args[n_tensors + 13:])
        self.ctl_row = st.ctl[st.rank]
        self.gpu = ws.device.type != "cpu"
        self.extra = None

    def usable(self) -> bool:
        """Whether this plan may serve a call now: its workspace is still the group's (not
        released), and nothing reported an error (the full path then raises the details)."""
        st, ws = self.st, self.ws
        return (not st.broken and not ws.broken and ws.err_host[ERR_CODE] == ERR_NONE
                and st.workspaces.get(ws.device) is ws)

    def __call__(self, *tensors) -> None:
        """Count the call in the group's sequence, record the path, launch."""
        st, ws = self.st, self.ws
        st.seq = seq = (st.seq + 1) & 0x7FFFFFFF
        self.ctl_row[CTL_SEQ] = seq
        record_path(self.op, self.path)
        head, header, scalars = self.ints
        args = (*tensors, *head, seq, *header, max_spins(ws.device), *scalars)
        if self.gpu and not SYNC_CHECK:  # (all _guarded would do: the hot path, inline)
            self.launch(*args)
            return
        _guarded(ws, self.launch, *args)


def find_plan(plans: dict, x, group, *rest, aligned=()):
    """``(key, plan)``: the plan key of a call on ``x`` (see :func:`plan_key`; None when ``x`` is
    not a tensor) and the plan in ``plans`` that may serve it now, or None: one must exist, be
    usable, and ``x`` and the ``aligned`` tensors (None allowed) be 16-byte aligned, ``x`` not
    the workspace tensor itself (that call skips the copy in)."""
    try:
        key = plan_key(x, group, *rest)
        plan = plans.get(key)
    except (AttributeError, TypeError):  # not a tensor: the op's checks name the problem
        return None, None
    if plan is None or not plan.usable() or x.data_ptr() & 15 or x.data_ptr() == plan.ws.data_ptr:
        return key, None
    for t in aligned:
        if t is not None and t.data_ptr() & 15:
            return key, None
    return key, plan


def plan_key(x: torch.Tensor, group, *rest):
    """The key of a collective call's plan: ``x``'s signature, the group (None: the world's
    current group object), the capture state and current device of a CUDA call, and ``rest``
    (the op's own arguments)."""
    device = x.device
    if device.type == "cuda":
        where = (_current_device(), _capturing())
    else:
        where = None
    return (x.shape, x.stride(), x.dtype, device, dist.group.WORLD if group is None else group,
            where, *rest)


def pieces(n: int, cap: int):
    """``(start, stop)`` of the consecutive pieces of at most ``cap`` of ``n`` elements."""
    cap = max(int(cap), 1)
    return [(s, min(s + cap, n)) for s in range(0, max(n, 1), cap)]


def handshake(ws, call: Call, numel: int, variant: int) -> None:
    """Announce this rank's header to the peers' kernels (see ``_handshake_kernel``)."""
    launch_collective(_handshake_kernel, 1, ws, call, numel, variant)


def check_comm_errors(ws) -> None:
    """Raise if a kernel on ``ws`` reported a missing, exited or mismatched peer (reads host
    memory).

    After an error the workspace's flags may be mid-handshake: it stays unusable until every rank
    calls ``aiter_dist.comm.release_workspaces()`` (the next collective then makes a new one).
    """
    if ws.broken:
        raise RuntimeError(f"aiter_dist: the workspace of {ws.describe()} is unusable after an "
                           f"earlier error ({ws.broken}); call aiter_dist.comm.release_workspaces() "
                           f"on every rank of the group, then retry")
    if ws.err_host[ERR_CODE] == ERR_NONE:  # numpy view of the record: no tensor op on the hot path
        return
    if ws.device.type != "cpu":  # the reporting kernel may still be writing the record
        torch.cuda.synchronize(ws.device)
    f = ws.err_host.copy()
    code, peer = int(f[ERR_CODE]), int(f[ERR_PEER])
    op = OP_NAMES.get(int(f[ERR_OP]), f"op {int(f[ERR_OP])}")
    mine = f[ERR_MY_HEADER:ERR_MY_HEADER + HEADER_WORDS]
    if int(mine[1]) in OP_NAMES:  # the op this rank launched (the handshake names the real op)
        op = OP_NAMES[int(mine[1])]
    where = f"aiter_dist.{op}: rank {peer} of {ws.describe()}"
    if code == ERR_TIMEOUT:
        msg = (f"{where} did not arrive within about {timeout_s():.0f} s (program "
               f"{int(f[ERR_PROGRAM])}); check that every rank of the group calls the same "
               f"collectives in the same order (AITER_DIST_COMM_TIMEOUT_S sets the wait)")
    elif code == ERR_PEER_EXITED:
        msg = (f"{where} exited (its process is gone) while this rank waited for it in "
               f"{_describe(mine)}")
    elif code == ERR_MISMATCH:
        theirs = f[ERR_PEER_HEADER:ERR_PEER_HEADER + HEADER_WORDS]
        msg = (f"{where} launched a different message: {_describe(theirs)}, against this rank's "
               f"{_describe(mine)}")
        if int(theirs[0]) != int(mine[0]):
            msg += "; the ranks have made different numbers of collective calls"
        elif all(int(theirs[i]) == int(mine[i]) for i in (1, 2, 4)):
            if int(theirs[5]) != int(mine[5]):
                msg += " (same size, different shapes or dim)"
            else:
                msg += " (same size: the algorithm or row width differs; pass the same algo=)"
        msg += "; every rank must pass tensors of the same shape and dtype to the same op"
    elif code == ERR_PEER_FAILED:
        theirs = f[ERR_PEER_HEADER:ERR_PEER_HEADER + HEADER_WORDS]
        msg = f"{where} stopped this collective after an error on its side"
        if any(int(theirs[i]) != int(mine[i]) for i in range(HEADER_WORDS - 1)):
            msg += (f": it launched {_describe(theirs)}, against this rank's {_describe(mine)}; "
                    f"every rank must pass tensors of the same shape and dtype to the same op")
        else:
            msg += " (a missing rank or a mismatch elsewhere in the group); it raises the details"
    else:
        msg = f"{where} reported error code {code}"
    ws.broken = msg
    ws.state.broken = msg
    raise RuntimeError(msg)


def check_comm_input(op: str, name: str, x, ndim_min: int = 0) -> None:
    """dtype, and the device: a CUDA tensor must be on this rank's current device, where the
    group's workspace lives (a tensor elsewhere would make a workspace the peers never join)."""
    check_tensor(op, name, x, dtypes=FLOAT_DTYPES, ndim_min=ndim_min)
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        raise ValueError(f"aiter_dist.{op}: {name} is on {x.device} but this rank's device is "
                         f"cuda:{torch.cuda.current_device()}; move it there or call "
                         f"torch.cuda.set_device() (aiter_dist.init_distributed() does)")


def group_name_of(group) -> str:
    """The name a custom op carries for ``group`` (None: the world)."""
    return resolve_group(group).group_name


def group_of(name: str):
    """The process group a custom op's ``group_name`` names."""
    return dist.distributed_c10d._resolve_process_group(name)


def resolve_group(group):
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("aiter_dist: no process group; call aiter_dist.init_distributed() "
                               "(or torch.distributed.init_process_group) first")
        return dist.group.WORLD
    return group
