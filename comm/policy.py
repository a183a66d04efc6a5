"""Which path serves a collective call, and how the ranks of a group agree on it.

Every collective call is routed here first: ``"identity"`` (a group of one), one of the op's
kernels (``"one_shot"``, ``"two_shot"``), or a composed path (``"torch.distributed"``, or a fused
op's unfused composition). ``algo="auto"`` picks by message size from tables measured per device,
launch mode and world size (``AUTO``); a group whose ranks span hosts or that is larger than the
kernels serve always takes torch.distributed (decided once per group, recorded).

Agreement. The choice depends on each rank's own arguments, so ranks that pass different messages
could split between a kernel, which waits for its peers inside the launch, and torch.distributed,
which waits inside NCCL or gloo: both would hang until the process group's timeout. Every call of
an eligible group therefore counts itself in the group's control block (``workspace.GroupState``),
and every call that does not go to a single kernel launch first publishes a record of itself and
waits (on the host, bounded by the comm timeout) for every peer to reach the same call:

* a peer with the same record: proceed;
* a peer with a different record (it too composes, but a different message): raise;
* a peer that reached this call without a record: it took a kernel. This rank then launches a
  handshake kernel carrying its own header, so the peer's kernel reports the difference instead
  of waiting out the timeout, and raises.

Calls that take a kernel only count themselves (one store): their kernels compare launch headers
on the device. Either way every rank raises, naming the op, the ranks and both sides' messages.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..kernels._runtime import INTERPRETED, record_path
from .protocol import (DTYPE_CODE, OP_NAMES, VARIANT_FALLBACK, Call, _capturing, _describe,
                       check_comm_errors, handshake, resolve_group, shape_key, timeout_s)
from .workspace import (CTL_SEQ, CTL_SLOT_WORDS, CTL_SLOTS, HEADER_WORDS, MAX_WORLD, _groups,
                        get_workspace, group_name, group_state)

# algo="auto": per op family, device row and world size, (largest message in bytes, algorithm)
# in increasing order; larger messages go to torch.distributed. "cuda" applies while a CUDA graph
# is captured, "cuda-eager" to eager calls, where every call pays the Python launch cost.
# cuda: benchmarks/results/h200.md (2x H200, bf16, graph replay): one-shot beats NCCL 1.16-1.30x
#   from 4 KB to 4 MB and loses from 16 MB (113 vs 75 us); all-gather and reduce-scatter beat
#   NCCL up to 4 MB and tie at 16 MB (benchmarks/results/h200_collectives.md, 2026-12-01).
#   Other world sizes use the 2-GPU figures until runs on 4 and 8 GPUs retune them.
# cuda-eager: every kernel call costs more host time than NCCL's (39 us against 14.5 in a group
#   of one on H200, benchmarks/results/h200_overhead.md; 60-130 against 35-60 on 2 GPUs before
#   the cached launch): NCCL serves eager calls until two-GPU runs show the kernel ahead.
# cpu: the CPU backend exists so the real kernels run in CI and in CPU training; gloo is faster
#   there, but small messages take the kernels so that CPU runs exercise both.
_WORLDS = range(2, MAX_WORLD + 1)
AUTO = {
    "all_reduce": {
        "cuda": {w: ((4 << 20, "one_shot"),) for w in _WORLDS},
        "cuda-eager": {w: () for w in _WORLDS},
        "cpu": {w: ((64 << 10, "one_shot"), (256 << 10, "two_shot")) for w in _WORLDS},
    },
    "gather_scatter": {
        "cuda": {w: ((4 << 20, "one_shot"),) for w in _WORLDS},
        "cuda-eager": {w: () for w in _WORLDS},
        "cpu": {w: ((256 << 10, "one_shot"),) for w in _WORLDS},
    },
    # Fused all-reduce / reduce-scatter / all-gather with add + RMSNorm: bytes of x.
    "fused_norm": {
        "cuda": {w: ((4 << 20, "one_shot"),) for w in _WORLDS},
        "cuda-eager": {w: () for w in _WORLDS},
        "cpu": {w: ((256 << 10, "one_shot"),) for w in _WORLDS},
    },
}


def auto_row(device: torch.device) -> str:
    """Which row of the tables applies to a call on ``device`` right now."""
    if device.type == "cpu":
        return "cpu"
    return "cuda" if _capturing() else "cuda-eager"


def auto_algo(family: str, device: torch.device, world: int, nbytes: int) -> str:
    """The algorithm ``algo="auto"`` takes (``"fallback"`` past the table)."""
    for limit, algo in AUTO[family][auto_row(device)].get(world, ()):
        if nbytes <= limit:
            return algo
    return "fallback"


class Route(NamedTuple):
    """A routed call: ``path`` is ``"identity"``, ``"fallback"`` (the composed path) or a kernel's
    algorithm; ``ws`` and ``call`` serve kernel launches and handshakes."""
    path: str
    ws: object
    call: Call | None
    world: int


def _fallback_device_ok(op: str, x: torch.Tensor, group) -> None:
    # A CPU tensor on a group without a CPU backend (NCCL only) would fail deep inside c10d.
    try:
        group._get_backend(x.device)
    except (RuntimeError, AttributeError):
        raise ValueError(f"aiter_dist.{op}: x is on {x.device} but the process group has no "
                         f"{x.device.type} backend ({dist.get_backend(group)}); move x to this "
                         f"rank's device or create the group with a backend for both, e.g. "
                         f"'cpu:gloo,cuda:nccl' (aiter_dist.init_distributed() does)") from None


def route(op: str, op_id: int, family: str, x: torch.Tensor, group, algo: str, *, nbytes: int,
          total: int, shape=None, dim: int = 0, kernel_limit: str | None = None,
          composed: str = "torch.distributed", one_rank_kernel: bool = False) -> Route:
    """Route one call of ``op`` on ``x`` and record the path (``last_path(op)``): the path, and
    for eligible groups the call's place in the group's sequence. ``kernel_limit``: why no kernel
    of the op can take this message; the call then composes (``composed`` names that path in the
    record). Composed paths are agreed with the peers before they start. ``one_rank_kernel``:
    a group of one still runs the kernel (tests)."""
    group = resolve_group(group)
    st = _groups.get(group_name(group))
    if st is not None and st.group is group:
        world = st.world_size
    else:
        world = dist.get_world_size(group)
        if world == 1 and not one_rank_kernel:
            record_path(op, "identity")
            return Route("identity", None, None, 1)
        st = group_state(group)
    if st.broken:
        raise RuntimeError(f"aiter_dist.{op}: {st.describe()} is unusable after an earlier error "
                           f"({st.broken}); call aiter_dist.comm.release_workspaces() on every "
                           f"rank of the group, then retry")
    reason = None
    if not st.eligible:
        path, reason = "fallback", st.reason
    elif x.device.type == "cpu" and not INTERPRETED:
        path, reason = "fallback", "CPU tensor on a GPU machine: Triton runs compiled here"
    elif algo == "fallback":
        path = "fallback"
    elif kernel_limit is not None:
        path, reason = "fallback", kernel_limit
    elif algo == "auto":
        path = auto_algo(family, x.device, world, nbytes)
    else:
        path = algo
    if path == "fallback":
        _fallback_device_ok(op, x, group)
    if not st.eligible:
        record_path(op, composed, reason)
        return Route("fallback", None, None, world)
    st.seq = seq = (st.seq + 1) & 0x7FFFFFFF
    call = Call(seq, op_id, DTYPE_CODE[x.dtype], total & 0x7FFFFFFF,
                shape_key(x.shape if shape is None else shape, dim))
    if path != "fallback":
        # Counted before the workspace (maybe created here, collectively): a composing peer
        # waiting in agree() must learn that this rank reached the call.
        st.ctl[st.rank, CTL_SEQ] = seq
        record_path(op, path)
        ws = st.workspaces.get(x.device)
        return Route(path, ws if ws is not None else get_workspace(group, x.device), call, world)
    agree(st, call, x.device, op, group)
    record_path(op, composed, reason)
    return Route("fallback", None, call, world)


# Control-block record of a composed call: its ordinal among the rank's composed calls, its
# header (numel: the message's) and its device type.
_REC_DEVICE = 1 + HEADER_WORDS


def _record(st, call: Call, device: torch.device) -> np.ndarray:
    rec = np.zeros(CTL_SLOT_WORDS, dtype=np.int64)
    rec[0] = st.composed
    rec[1:1 + HEADER_WORDS] = (call.seq, call.op, call.dtype, call.total, call.total, call.key,
                               VARIANT_FALLBACK, 0)
    rec[_REC_DEVICE] = 0 if device.type == "cpu" else 1
    return rec


def _slot(k: int) -> slice:
    start = CTL_SLOTS + (k % 2) * CTL_SLOT_WORDS
    return slice(start, start + CTL_SLOT_WORDS)


def agree(st, call: Call, device: torch.device, op: str, group) -> None:
    """Publish this composed call and wait until every peer reached it; raise unless every peer
    composes the same message at the same call (see the module docstring).

    The k-th composed call of a rank is recorded in slot ``k % 2``, then the rank's call count is
    raised. A peer can be at most one composed call ahead (its next one waits for this rank), so
    the slot this rank reads still holds the peer's k-th record when there is one. Reading a
    peer's count first, then its slot (stores and loads stay in order on one host's shared
    memory), a count at or past this call with no k-th record means the peer did not compose it.
    """
    st.composed += 1
    mine = _record(st, call, device)
    ctl = st.ctl
    ctl[st.rank, _slot(st.composed)] = mine
    ctl[st.rank, CTL_SEQ] = call.seq  # after the record: a peer that sees the count sees it
    deadline = time.monotonic() + timeout_s()
    pending = [r for r in range(st.world_size) if r != st.rank]
    pause = 0.0
    while pending:
        still = []
        for r in pending:
            seq = int(ctl[r, CTL_SEQ])
            if (seq - call.seq) & 0x7FFFFFFF > 0x3FFFFFFF:  # behind (modular comparison)
                still.append(r)
                continue
            theirs = ctl[r, _slot(st.composed)].copy()
            if int(theirs[0]) != st.composed or int(theirs[1]) != call.seq:
                # No composed record for this call: the peer's call here went to a kernel.
                _disagree(st, call, device, op, group, r, None)
            elif not (theirs == mine).all():
                _disagree(st, call, device, op, group, r, theirs)
        pending = still
        if not pending:
            return
        if st.exited_peer is not None:
            st.broken = f"rank {st.exited_peer} exited"
            raise RuntimeError(f"aiter_dist.{op}: rank {st.exited_peer} of {st.describe()} exited "
                               f"(its process is gone) while this rank waited for it")
        if time.monotonic() > deadline:
            st.broken = f"rank {pending[0]} did not arrive"
            raise RuntimeError(f"aiter_dist.{op}: rank {pending[0]} of {st.describe()} did not "
                               f"reach this call (#{call.seq}) within {timeout_s():.0f} s; check "
                               f"that every rank of the group calls the same collectives in the "
                               f"same order (AITER_DIST_COMM_TIMEOUT_S sets the wait)")
        time.sleep(pause)
        pause = min(max(pause * 2, 1e-5), 1e-3)


def _disagree(st, call, device, op, group, peer, theirs) -> None:
    """Peer ``peer`` reached this call but does not compose the same message: release its kernel
    (if it took one) with a handshake, then raise."""
    mine = _record(st, call, device)
    if theirs is None:
        # It took a kernel (or made different calls): announce this rank's header to it; its
        # kernel reports the difference, and so does this rank's handshake, with its header.
        st.broken = f"rank {peer} took a kernel at call #{call.seq}"
        try:
            ws = get_workspace(group, device)
            handshake(ws, call, call.total, VARIANT_FALLBACK)
            if device.type != "cpu":
                torch.cuda.current_stream(device).synchronize()
                check_comm_errors(ws)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (this rank composes the call from torch.distributed, rank "
                               f"{peer} took the custom kernel)") from None
        raise RuntimeError(f"aiter_dist.{op}: rank {peer} of {st.describe()} took the custom "
                           f"kernel at this call while this rank composes "
                           f"{_describe(mine[1:])}; every rank must pass the same message and "
                           f"algo")
    what = ("the call on a different device type" if theirs[_REC_DEVICE] != mine[_REC_DEVICE]
            else _describe(theirs[1:]))
    st.broken = f"rank {peer} composed a different message"
    raise RuntimeError(f"aiter_dist.{op}: rank {peer} of {st.describe()} called {what}, against "
                       f"this rank's {_describe(mine[1:])}; every rank must pass tensors of the "
                       f"same shape and dtype to the same op")


__all__ = ["AUTO", "auto_algo", "auto_row", "route", "agree", "Route", "OP_NAMES"]
