"""Distributed GEMM for tensor / sequence parallelism: the all-gather of the tokens overlapped with
the GEMM that consumes them, and the GEMM overlapped with the reduce-scatter of what it produces.

    all_gather_gemm(x, W, b)      = all_gather(x, dim=0) @ W.T + b       (column-parallel forward)
    gemm_reduce_scatter(x, W, b)  = reduce_scatter(x @ W.T, dim=0) + b   (row-parallel forward)

Paths (``aiter_dist.last_path(op)``):

* ``"overlapped"``: over the group's symmetric workspace (``comm/workspace.py``), in ring order.
  all_gather_gemm: every rank puts its ``x`` in its workspace; after a start barrier each rank
  multiplies its own rows first (no wait), then copies peer ``rank+1``'s, ``rank+2``'s, ... rows
  out of the peers' workspaces and multiplies each into its rows of the output; an end barrier
  tells every rank that no peer reads its workspace any more. gemm_reduce_scatter: after a start
  barrier each rank computes, for destination ``rank+1``, ``rank+2``, ..., itself, the partial
  product of that destination's rows and writes it into the destination's workspace slot for
  this source; a second barrier, and every rank sums its ``world`` slots in rank order in fp32,
  adds the bias and rounds once (every layout of ranks gives the same bits). On GPUs the copies
  run on a side stream (device-to-device / peer copies: the copy engine, no SMs) while the GEMMs
  run on the caller's stream; events order the two.
* ``"all_gather+gemm"`` / ``"gemm+reduce_scatter"``: the collective (``all_gather_raw`` /
  ``reduce_scatter_raw``) and the GEMM one after the other: problems below the size gate
  (``OVERLAP_MIN_ROWS``), ``algo="gated"``, a row too large for the workspace, groups the
  workspace cannot serve (several hosts).
* ``"identity"``: a group of one: the plain GEMM.

The barriers are the protocol's own (``comm/protocol.py``): one-program kernels that write the
launch header, meet every peer's program 0 on channel 0 and compare headers (ranks that pass
different shapes or dtypes raise, none hangs), and meet again on channel 1. Composed paths agree
with the peers through ``policy.route`` like every collective.

Backward (Megatron's conventions, each a dual op of the same family):

    all_gather_gemm:      dx = gemm_reduce_scatter(dy, W.T);  dW = dy.T @ all_gather(x)  (x is
                          gathered again, not saved);  db = dy.sum(0)
    gemm_reduce_scatter:  dx, dy_all = all_gather_gemm(dy, W.T) (the gathered dy is kept);
                          dW = dy_all.T @ x;  db = dy_all.sum(0) (the same on every rank)
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import cdiv, compiling
from ..kernels.gemm import (DTYPE_NAMES, autocast_inputs, check_linear_inputs, linear_backends,
                            linear_wgrad, run_gemm)
from .gather_scatter import all_gather_raw, reduce_scatter_raw
from .policy import route
from .protocol import (OP_NAMES, _meet, _peer_buf, _report_mismatch, _start, check_comm_input,
                       group_name_of, group_of, launch_collective, pieces, resolve_group)
from .workspace import max_grid, workspace_data_bytes

OP_ALL_GATHER_GEMM, OP_GEMM_REDUCE_SCATTER = 10, 11
OP_NAMES.update({OP_ALL_GATHER_GEMM: "all_gather_gemm",
                 OP_GEMM_REDUCE_SCATTER: "gemm_reduce_scatter"})
ALGOS = ("auto", "overlapped", "gated")

# Size gate of algo="auto": problems with fewer rows than this (all ranks' tokens, M) take the
# collective and the GEMM one after the other. CPU: 0, so CPU runs exercise the overlapped path.
# cuda: a first guess from published async-TP figures (it loses to NCCL + cuBLAS at M <= 2048 on
# 8 GPUs, wins from 4096); to be measured on 2 GPUs with benchmarks/bench_dist_gemm.py.
OVERLAP_MIN_ROWS = {"cpu": 0, "cuda": 4096}


def _sum_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK elements per program step, num_warps) of the slot-summing kernel: memory-bound,
    2048 x fp32 accumulators over 8 warps (the gather/scatter kernels' figures on H200)."""
    return (16384, 1) if device.type == "cpu" else (2048, 8)


# ----------------------------------------------------------------------------- references

def all_gather_gemm_ref(xs, weight, bias=None):
    """float64 ``cat(xs, 0) @ weight.T + bias``; ``xs``: every rank's x, in rank order."""
    x = torch.cat([t.double() for t in xs], 0)
    out = x @ weight.double().t()
    return out + bias.double() if bias is not None else out


def gemm_reduce_scatter_ref(xs, weights, rank, bias=None):
    """float64 chunk ``rank`` (dim 0) of ``sum_r xs[r] @ weights[r].T``, plus ``bias``."""
    total = sum(x.double() @ w.double().t() for x, w in zip(xs, weights))
    out = total.chunk(len(xs), 0)[rank]
    return out + bias.double() if bias is not None else out


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "numel", "total", "key", "variant",
                               "rank", "world", "max_spins"])
def _start_kernel(
    BUF_PTRS, SIG_PTRS, ERR,  # workspace pointer tables [world] and error record
    seq, op_id, dtype_code, numel, total, key, variant,  # launch header (protocol.Header)
    rank, world, max_spins,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    ABORT_POLL: tl.constexpr, HWORDS: tl.constexpr,
):
    # Header, barrier on channel 0, header check: after it every peer's data is in its
    # workspace (all_gather_gemm) or every peer is done with its workspace (gemm_reduce_scatter).
    failed, bad = _start(ERR, BUF_PTRS, SIG_PTRS, ERR, 0, 0, 0, seq, op_id, dtype_code, numel,
                         total, key, variant, rank, world, max_spins, False, MAX_PROGRAMS,
                         MAX_WORLD_, HEADER, ABORT_POLL, HWORDS, 16)
    _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad, MAX_PROGRAMS, MAX_WORLD_,
                     HWORDS)


@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "numel", "total", "key", "variant",
                               "rank", "world", "max_spins"])
def _end_kernel(
    BUF_PTRS, SIG_PTRS, ERR,
    seq, op_id, dtype_code, numel, total, key, variant,
    rank, world, max_spins,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    ABORT_POLL: tl.constexpr, HWORDS: tl.constexpr,
):
    # Barrier on channel 1: every peer has finished its copies out of this rank's workspace.
    _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, 1, MAX_PROGRAMS, MAX_WORLD_,
          ABORT_POLL, HWORDS)


@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "total", "key", "variant", "rank",
                               "world", "max_spins"])
def _sum_slots_kernel(
    BIAS,  # (N,) bias, or any pointer when HAS_BIAS is False
    OUT,  # (numel // N, N) contiguous: this rank's rows of the result (this piece)
    BUF_PTRS, SIG_PTRS, ERR,
    seq, op_id, dtype_code, numel, total, key, variant,  # numel: elements of one slot
    rank, world, max_spins,
    N,  # columns (bias length)
    HAS_BIAS: tl.constexpr, MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr,
    HEADER: tl.constexpr, ABORT_POLL: tl.constexpr, HWORDS: tl.constexpr, BLOCK: tl.constexpr,
):
    # This rank's workspace holds world slots of numel elements, slot s written by rank s. Meet
    # every peer (their copies into the slots came first on their streams), then sum the slots in
    # rank order in fp32, add the bias and round once. No closing barrier: peers write into this
    # workspace again only after the next call's start barrier, which follows these reads.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = OUT.dtype.element_ty
    failed = _meet(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, 1, MAX_PROGRAMS,
                   MAX_WORLD_, ABORT_POLL, HWORDS)
    if failed == 0:
        slots = _peer_buf(BUF_PTRS, rank, elem_ty, HEADER)
        offs0 = tl.arange(0, BLOCK)
        for start in range(pid * BLOCK, numel, nprog * BLOCK):
            offs = start + offs0
            mask = offs < numel
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for s in range(world):
                acc += tl.load(slots + tl.cast(s, tl.int64) * numel + offs, mask=mask, other=0.0,
                               cache_modifier=".cg").to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + offs, acc.to(elem_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _launch_barrier(kernel, ws, call, numel: int, piece: int) -> None:
    launch_collective(kernel, 1, ws, call, numel, piece, num_warps=1)


def _launch_sum(ws, call, bias, out, rows: int, n: int, piece: int) -> None:
    numel = rows * n
    block, warps = _sum_config(out.device)
    programs = max(1, min(cdiv(max(numel, 1), block), max_grid(ws)))
    launch_collective(_sum_slots_kernel, programs, ws, call, numel, piece,
                      tensors=(bias if bias is not None else out, out), scalars=(n,),
                      HAS_BIAS=bias is not None, BLOCK=block, num_warps=warps)


@functools.lru_cache(maxsize=1024)
def _gemm_backend(op: str, M: int, N: int, K: int, dtype, device) -> str:
    # tgemm.mm's policy (the vendor's GEMM unless the tuned table found ours faster), per shape.
    return linear_backends(op, M, N, K, dtype, device, "auto", prefer="vendor")[0]


def _gemm_into(a, weight, bias, out, op: str) -> None:
    """``out = a @ weight.T + bias`` written in place (``out`` may be a row slice or a workspace
    view): a (rows, K), weight (N, K) any strides, out (rows, N) contiguous."""
    if a.shape[0] == 0:
        return
    backend = _gemm_backend(op, a.shape[0], weight.shape[0], a.shape[1], a.dtype, a.device)
    if backend == "triton":
        run_gemm(op + ".gemm", DTYPE_NAMES[a.dtype], a, weight.t(), out, bias)
    elif bias is not None:
        torch.addmm(bias, a, weight.t(), out=out)
    else:
        torch.mm(a, weight.t(), out=out)


_side_streams: dict = {}


def _side_stream(device: torch.device):
    s = _side_streams.get(device)
    if s is None:
        # High priority: the barrier and the copies it issues get SMs / copy engines ahead of
        # the caller's GEMMs, which they must run under.
        s = _side_streams[device] = torch.cuda.Stream(device, priority=-1)
    return s


def _pieces(m: int, cap: int):
    """Row ranges of at most ``cap`` rows covering ``m``, of even sizes (no 1-row tail piece that
    would cost a whole barrier round for nothing)."""
    n = cdiv(max(m, 1), max(cap, 1))
    return pieces(m, cdiv(max(m, 1), n))


def _check(op, x, weight, bias, algo):
    check_linear_inputs(op, x, weight, bias)
    check_comm_input(op, "x", x, ndim_min=2)
    if algo not in ALGOS:
        raise ValueError(f"aiter_dist.{op}: algo must be one of {', '.join(ALGOS)}, got {algo!r}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _plan(op, rows_total: int, row_bytes: int, x2, group, algo) -> tuple[str, str | None]:
    """(algo for ``route``, why the overlapped path cannot take it or None)."""
    if algo == "gated" or (algo == "auto" and rows_total < OVERLAP_MIN_ROWS[
            "cpu" if x2.device.type == "cpu" else "cuda"]):
        return "fallback", None
    room = workspace_data_bytes(group, x2.device)
    if row_bytes > room:
        return "overlapped", (f"one row of {row_bytes} B exceeds the {room} B workspace "
                              f"(AITER_DIST_WORKSPACE_BYTES makes a larger one)")
    return "overlapped", None


def all_gather_gemm_fwd(x, weight, bias, group, algo="auto", keep_gathered=False):
    """``(out, gathered)``: out = all_gather(x, 0) @ weight.T + bias as (world * m, n) rows in
    rank order; ``gathered`` = the gathered x as (world * m, K) when ``keep_gathered``, else None.
    x (..., K) is flattened to its m rows (contiguous); checks as :func:`all_gather_gemm`."""
    op = "all_gather_gemm"
    _check(op, x, weight, bias, algo)
    group = resolve_group(group)
    x2 = _rows(x)
    m, K = x2.shape
    n = weight.shape[0]
    world = dist.get_world_size(group)
    path, limit = _plan(op, world * m, K * x2.element_size(), x2, group, algo)
    r = route(op, OP_ALL_GATHER_GEMM, "gather_scatter", x2, group, path,
              nbytes=x2.numel() * x2.element_size(), total=x2.numel(), shape=x.shape,
              kernel_limit=limit, composed="all_gather+gemm")
    if r.path == "identity" or r.path == "fallback":
        xg = all_gather_raw(x2, 0, group, "auto") if r.path == "fallback" else x2
        out = torch.empty(xg.shape[0], n, dtype=x2.dtype, device=x2.device)
        _gemm_into(xg, weight, bias, out, op)
        return out, (xg if keep_gathered else None)
    ws, rank = r.ws, dist.get_rank(group)
    out = torch.empty(world * m, n, dtype=x2.dtype, device=x2.device)
    # Peers' rows land here (own rows too when kept); the own slot is unused otherwise.
    gathered = torch.empty(world, m, K, dtype=x2.dtype, device=x2.device)
    peers = [(rank + s) % world for s in range(1, world)]  # ring order: reads spread over ranks
    cap = ws.data_bytes // max(K * x2.element_size(), 1)
    gpu = x2.device.type != "cpu"
    for i, (a, b) in enumerate(_pieces(m, cap)):
        rows = b - a
        mine = ws.peer_tensor(rank, (rows, K), x2.dtype)
        own_out = out[rank * m + a:rank * m + b]
        if not gpu:
            mine.copy_(x2[a:b])
            _launch_barrier(_start_kernel, ws, r.call, rows * K, i)
            _gemm_into(x2[a:b], weight, bias, own_out, op)
            for p in peers:
                gathered[p, a:b].copy_(ws.peer_tensor(p, (rows, K), x2.dtype))
                _gemm_into(gathered[p, a:b], weight, bias, out[p * m + a:p * m + b], op)
            _launch_barrier(_end_kernel, ws, r.call, rows * K, i)
        else:
            main, side = torch.cuda.current_stream(x2.device), _side_stream(x2.device)
            side.wait_stream(main)  # after whatever produced x and the previous collective
            ready = []
            with torch.cuda.stream(side):
                mine.copy_(x2[a:b])
                _launch_barrier(_start_kernel, ws, r.call, rows * K, i)
                for p in peers:
                    gathered[p, a:b].copy_(ws.peer_tensor(p, (rows, K), x2.dtype))
                    ev = torch.cuda.Event()
                    ev.record(side)
                    ready.append(ev)
            _gemm_into(x2[a:b], weight, bias, own_out, op)  # overlaps the copy-in and barrier
            for p, ev in zip(peers, ready):
                main.wait_event(ev)
                _gemm_into(gathered[p, a:b], weight, bias, out[p * m + a:p * m + b], op)
            main.wait_stream(side)
            _launch_barrier(_end_kernel, ws, r.call, rows * K, i)
    if keep_gathered:
        gathered[rank].copy_(x2)
        return out, gathered.view(world * m, K)
    return out, None


def gemm_reduce_scatter_fwd(x, weight, bias, group, algo="auto"):
    """(M / world, N) = reduce_scatter(x2 @ weight.T, 0) + bias for x (M, ..., k) flattened to
    rows (contiguous); checks as :func:`gemm_reduce_scatter`."""
    op = "gemm_reduce_scatter"
    _check(op, x, weight, bias, algo)
    group = resolve_group(group)
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"aiter_dist.{op}: x.shape[0]={x.shape[0]} is not divisible by the "
                         f"world size {world}; pad the tokens to a multiple of {world}")
    x2 = _rows(x)
    M = x2.shape[0]
    m, N = M // world, weight.shape[0]
    path, limit = _plan(op, M, world * N * x2.element_size(), x2, group, algo)
    # The message is the product (M, N): k may differ between ranks (uneven feature shards).
    r = route(op, OP_GEMM_REDUCE_SCATTER, "gather_scatter", x2, group, path,
              nbytes=M * N * x2.element_size(), total=M * N, shape=(*x.shape[:-1], N),
              kernel_limit=limit, composed="gemm+reduce_scatter")
    if r.path == "identity" or r.path == "fallback":
        part = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
        _gemm_into(x2, weight, None if r.path == "fallback" else bias, part, op)
        if r.path == "identity":
            return part
        out = reduce_scatter_raw(part, 0, group, "auto")
        return out.add_(bias) if bias is not None else out
    ws, rank = r.ws, dist.get_rank(group)
    out = torch.empty(m, N, dtype=x2.dtype, device=x2.device)
    dests = [(rank + s) % world for s in range(1, world)]  # ring order, own rows last
    esize = x2.element_size()
    cap = ws.data_bytes // max(world * N * esize, 1)
    gpu = x2.device.type != "cpu"
    # GPU: partials for the peers wait here for their copy (one per peer: no reuse to guard).
    staging = torch.empty(world - 1, min(cap, m), N, dtype=x2.dtype, device=x2.device) \
        if gpu else None
    for i, (a, b) in enumerate(_pieces(m, cap)):
        rows = b - a

        def slot(dest, src):  # dest's slot for partials from src (this piece's layout)
            return ws.peer_tensor(dest, (rows, N), x2.dtype, offset=src * rows * N * esize)

        def part_rows(dest):
            return x2[dest * m + a:dest * m + b]

        if not gpu:
            _launch_barrier(_start_kernel, ws, r.call, rows * N, i)
            for d in dests:  # straight into the peer's slot (shared memory)
                _gemm_into(part_rows(d), weight, None, slot(d, rank), op)
        else:
            main, side = torch.cuda.current_stream(x2.device), _side_stream(x2.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _launch_barrier(_start_kernel, ws, r.call, rows * N, i)  # overlaps the 1st GEMM
            for j, d in enumerate(dests):
                _gemm_into(part_rows(d), weight, None, staging[j, :rows], op)
                done = torch.cuda.Event()
                done.record(main)
                with torch.cuda.stream(side):
                    side.wait_event(done)
                    slot(d, rank).copy_(staging[j, :rows])  # peer copy, under the next GEMM
        # Own rows last, straight into this rank's own slot: the last copy runs under it. (Not
        # ordered after the start barrier on the side stream, and needs not be: no peer reads or
        # writes this slot, and the previous collective on the workspace ended with a barrier.)
        _gemm_into(part_rows(rank), weight, None, slot(rank, rank), op)
        if gpu:
            main.wait_stream(side)
        _launch_sum(ws, r.call, bias, out[a:b], rows, N, i)
    return out


# ----------------------------------------------------------------------------- backward

def all_gather_gemm_bwd(dy, x, weight, group, algo="auto", need_dx=True, need_dw=True,
                        need_db=False):
    """(dx, dweight, dbias) of all_gather_gemm (None where not needed): dx =
    gemm_reduce_scatter(dy, weight.T), dweight = dy.T @ all_gather(x) (x gathered again),
    dbias = dy.sum(0) in fp32."""
    n = weight.shape[0]
    dy2 = dy.reshape(-1, n)
    dx = dw = db = None
    if need_dx:
        dx = gemm_reduce_scatter_fwd(dy2, weight.t(), None, group, algo).view(x.shape)
    if need_dw:
        xg = all_gather_raw(_rows(x), 0, group, "auto")
        dw = linear_wgrad(dy2, xg, _gemm_backend("all_gather_gemm.wgrad", n, xg.shape[1],
                                                 xg.shape[0], dy2.dtype, dy2.device),
                          "all_gather_gemm")
    if need_db:
        db = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db


def gemm_reduce_scatter_bwd(dy, x, weight, group, algo="auto", need_dx=True, need_dw=True,
                            need_db=False):
    """(dx, dweight, dbias) of gemm_reduce_scatter (None where not needed): dy is gathered once
    (under the dx GEMM when dx is needed): dx = dy_all @ weight, dweight = dy_all.T @ x,
    dbias = dy_all.sum(0) in fp32 (the gradient of the bias every rank added)."""
    N = weight.shape[0]
    dy2 = dy.reshape(-1, N)
    dx = dw = db = None
    if need_dx:
        dx, dyg = all_gather_gemm_fwd(dy2, weight.t(), None, group, algo, keep_gathered=True)
        dx = dx.view(x.shape)
    elif need_dw or need_db:
        dyg = all_gather_raw(dy2.contiguous(), 0, group, "auto")
    if need_dw:
        x2 = _rows(x)
        dw = linear_wgrad(dyg, x2, _gemm_backend("gemm_reduce_scatter.wgrad", N, x2.shape[1],
                                                 x2.shape[0], dyg.dtype, dyg.device),
                          "gemm_reduce_scatter")
    if need_db:
        db = dyg.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- autograd

class AllGatherGemmFunction(torch.autograd.Function):
    """all_gather(x) @ weight.T + bias; saves x and weight (not the gathered x)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, algo):
        out, _ = all_gather_gemm_fwd(x, weight, bias, group, algo)
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.has_bias = (group, algo), bias is not None
        return out.view(_gathered_shape(x, weight, group))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = all_gather_gemm_bwd(dy, x, weight, *ctx.args, need[0], need[1],
                                         ctx.has_bias and need[2])
        return dx, dw, db, None, None


class GemmReduceScatterFunction(torch.autograd.Function):
    """reduce_scatter(x @ weight.T) + bias; saves x and weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, algo):
        out = gemm_reduce_scatter_fwd(x, weight, bias, group, algo)
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.has_bias = (group, algo), bias is not None
        return out.view(_scattered_shape(x, weight, group))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = gemm_reduce_scatter_bwd(dy, x, weight, *ctx.args, need[0], need[1],
                                             ctx.has_bias and need[2])
        return dx, dw, db, None, None


def _world(group) -> int:
    return dist.get_world_size(resolve_group(group))


def _gathered_shape(x, weight, group, world=None):
    world = _world(group) if world is None else world
    return (world * x.shape[0], *x.shape[1:-1], weight.shape[0])


def _scattered_shape(x, weight, group, world=None):
    world = _world(group) if world is None else world
    return (x.shape[0] // world, *x.shape[1:-1], weight.shape[0])


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::all_gather_gemm", mutates_args=())
def _all_gather_gemm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        group_name: str, algo: str) -> torch.Tensor:
    group = group_of(group_name)
    return all_gather_gemm_fwd(x, weight, bias, group, algo)[0].view(
        _gathered_shape(x, weight, group))


@_all_gather_gemm_op.register_fake
def _(x, weight, bias, group_name, algo):
    return x.new_empty(_gathered_shape(x, weight, None, group_of(group_name).size()))


@torch.library.custom_op("aiter_dist::gemm_reduce_scatter", mutates_args=())
def _gemm_reduce_scatter_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            group_name: str, algo: str) -> torch.Tensor:
    group = group_of(group_name)
    return gemm_reduce_scatter_fwd(x, weight, bias, group, algo).view(
        _scattered_shape(x, weight, group))


@_gemm_reduce_scatter_op.register_fake
def _(x, weight, bias, group_name, algo):
    return x.new_empty(_scattered_shape(x, weight, None, group_of(group_name).size()))


def _bwd_outputs(x, weight, grads):
    # A fresh empty tensor for each gradient not needed: an op's outputs may not be None.
    dx, dw, db = grads
    return (dx if dx is not None else x.new_empty(0), dw if dw is not None else x.new_empty(0),
            db if db is not None else x.new_empty(0))


@torch.library.custom_op("aiter_dist::all_gather_gemm_bwd", mutates_args=())
def _all_gather_gemm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            group_name: str, algo: str, need_dx: bool, need_dw: bool,
                            need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_outputs(x, weight, all_gather_gemm_bwd(dy, x, weight, group_of(group_name), algo,
                                                       need_dx, need_dw, need_db))


@torch.library.custom_op("aiter_dist::gemm_reduce_scatter_bwd", mutates_args=())
def _gemm_reduce_scatter_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                group_name: str, algo: str, need_dx: bool, need_dw: bool,
                                need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_outputs(x, weight, gemm_reduce_scatter_bwd(
        dy, x, weight, group_of(group_name), algo, need_dx, need_dw, need_db))


def _bwd_fake(dy, x, weight, group_name, algo, need_dx, need_dw, need_db):
    # Contiguous, as the real gradients are, whatever the inputs' strides.
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_db else x.new_empty(0))


_all_gather_gemm_bwd_op.register_fake(_bwd_fake)
_gemm_reduce_scatter_bwd_op.register_fake(_bwd_fake)


def _setup(ctx, inputs, output):
    x, weight, bias, group_name, algo = inputs
    ctx.save_for_backward(x, weight)
    ctx.args, ctx.has_bias = (group_name, algo), bias is not None


def _backward_of(bwd_op):
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_db = ctx.has_bias and need[2]
        dx, dw, db = bwd_op(dy, x, weight, *ctx.args, need[0], need[1], need_db)
        return (dx if need[0] else None, dw if need[1] else None, db if need_db else None,
                None, None)
    return backward


torch.library.register_autograd(
    "aiter_dist::all_gather_gemm",
    _backward_of(lambda *a: torch.ops.aiter_dist.all_gather_gemm_bwd(*a)), setup_context=_setup)
torch.library.register_autograd(
    "aiter_dist::gemm_reduce_scatter",
    _backward_of(lambda *a: torch.ops.aiter_dist.gemm_reduce_scatter_bwd(*a)),
    setup_context=_setup)


# ----------------------------------------------------------------------------- functional API

def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def all_gather_gemm(x, weight, bias=None, group=None, *, algo="auto"):
    """``all_gather(x, dim=0) @ weight.T + bias``, the gather overlapped with the GEMM
    (column-parallel linear on sequence-parallel input).

    Args:
        x: (d0, ..., K), this rank's tokens (m = d0 * ... rows), float32, float16 or bfloat16 on
            this rank's device; every rank passes the same shape and dtype (a mismatch raises
            on every rank).
        weight: (n, K), this rank's shard of the output features (nn.Linear layout), x's dtype.
        bias: (n,) or None, x's dtype.
        group: the process group (None: the world).
        algo: ``"auto"`` (overlapped from ``OVERLAP_MIN_ROWS`` rows of the gathered input, else
            the collective then the GEMM), ``"overlapped"`` or ``"gated"`` (collective, then
            GEMM). ``last_path("all_gather_gemm")`` names the path that served.

    Returns:
        (world * d0, ..., n): rank r's rows at ``r*d0 .. (r+1)*d0``, in x's dtype.

    Autograd: dx = reduce_scatter(dy @ weight) (through :func:`gemm_reduce_scatter`), dweight =
    dy.T @ all_gather(x) (x is gathered again in the backward, not kept), dbias = dy.sum(0).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    if compiling():
        return torch.ops.aiter_dist.all_gather_gemm(x, weight, bias, group_name_of(group), algo)
    if _needs_grad(x, weight, bias):
        return AllGatherGemmFunction.apply(x, weight, bias, group, algo)
    return all_gather_gemm_fwd(x, weight, bias, group, algo)[0].view(
        _gathered_shape(x, weight, group))


def gemm_reduce_scatter(x, weight, bias=None, group=None, *, algo="auto"):
    """``reduce_scatter(x @ weight.T, dim=0) + bias``, the GEMM overlapped with the reduce-scatter
    (row-parallel linear with sequence-parallel output).

    Args:
        x: (M, ..., k), all tokens and this rank's slice of the input features; M must be
            divisible by the world size; M, the other leading dims and dtype agree across ranks
            (k may differ).
        weight: (N, k), this rank's shard of the input features (nn.Linear layout), x's dtype.
        bias: (N,) or None, added once after the sum (the same on every rank).
        group, algo: as in :func:`all_gather_gemm`; ``last_path("gemm_reduce_scatter")``.

    Returns:
        (M / world, ..., N): this rank's chunk of the rows. On the overlapped path partial
        products are rounded to x's dtype, summed over ranks in rank order in fp32 with the bias
        and rounded once: every layout of ranks gives the same bits.

    Autograd: dy is all-gathered (under the dx GEMM): dx = dy_all @ weight, dweight =
    dy_all.T @ x, dbias = dy_all.sum(0) (the full gradient, identical on every rank).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    if compiling():
        return torch.ops.aiter_dist.gemm_reduce_scatter(x, weight, bias, group_name_of(group),
                                                        algo)
    if _needs_grad(x, weight, bias):
        return GemmReduceScatterFunction.apply(x, weight, bias, group, algo)
    return gemm_reduce_scatter_fwd(x, weight, bias, group, algo).view(
        _scattered_shape(x, weight, group))


__all__ = ["all_gather_gemm", "gemm_reduce_scatter", "all_gather_gemm_ref",
           "gemm_reduce_scatter_ref", "all_gather_gemm_fwd", "gemm_reduce_scatter_fwd",
           "all_gather_gemm_bwd", "gemm_reduce_scatter_bwd", "AllGatherGemmFunction",
           "GemmReduceScatterFunction", "OVERLAP_MIN_ROWS"]
