"""Collectives fused with (residual add and) RMSNorm: where a tensor-parallel layer's partial output
meets the residual stream and the next norm.

    all_reduce_add_rms_norm(x, residual, w):     residual_out = all_reduce(x) + residual
                                                 out = norm(residual_out) * w
    reduce_scatter_add_rms_norm(x, residual, w): residual_out = reduce_scatter(x, dim=0) + residual
                                                 out = norm(residual_out) * w    (a shard)
    rms_norm_all_gather(x, w):                   out = all_gather(norm(x) * w, dim=0)

where ``norm(r) = r / sqrt(mean(r**2, dim=-1) + eps)`` over the last dimension (fp32 statistics), so
``norm(r) * w`` is ``rms_norm(r, w, eps)``: the weight is applied once.

Each is one launch of one kernel (``MODE``) on the protocol of ``comm/protocol.py``, by rows:
program ``p`` owns row blocks ``p, p + nprog, ...`` (of every rank's chunk, for the scatter) in every
step. The sums are in rank order with fp32 accumulation and rounded to the dtype as the plain
collective would, so every rank holds the same bits and ``residual_out`` equals the unfused
composition's bit for bit.

``all_reduce_add_rms_norm_fp8`` is the first with ``out`` quantized to fp8 (e4m3) with one fp32 scale
per token (row), for fp8 GEMMs downstream: ``out.float() * scale`` approximates the normalized rows.

``x`` and ``residual`` may differ in dtype (an autocast matmul's bf16 output meeting an fp32 residual
stream): the sum is rounded to x's dtype as the collective would, and ``residual_out`` and ``out``
take the promoted dtype, as ``all_reduce(x) + residual`` would.

Autograd, Megatron's conventions: the all-reduce's backward is the identity, the reduce-scatter's
an all-gather, the all-gather's a reduce-scatter. In the two sequence-parallel ops each rank sees
only its shard of tokens, so the weight's gradient is summed over the group in the backward: every
rank then holds the same full gradient, as in the plain tensor-parallel op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels.rmsnorm import (_check_norm_inputs, add_rms_norm_bwd, add_rms_norm_ref,
                               rms_norm_bwd, rms_norm_fwd, rms_norm_ref)
from .all_reduce import all_reduce_raw
from .gather_scatter import all_gather_raw, reduce_scatter_raw
from ..kernels._runtime import cdiv, compiling, next_pow2, plan_cache, signature
from ..kernels.gemm_fp8 import FP8_MIN_SCALE  # one convention for an all-zero row's scale
from .policy import route
from .protocol import (OP_NAMES, _finish, _peer_buf, _report_mismatch, _start, check_comm_input,
                       find_plan, group_name_of, group_of, launch_collective, pieces,
                       resolve_group)
from .workspace import max_grid, workspace_data_bytes

OP_ALL_REDUCE_ADD_RMS_NORM, OP_REDUCE_SCATTER_ADD_RMS_NORM, OP_RMS_NORM_ALL_GATHER = 4, 5, 6
OP_NAMES.update({OP_ALL_REDUCE_ADD_RMS_NORM: "all_reduce_add_rms_norm",
                 OP_REDUCE_SCATTER_ADD_RMS_NORM: "reduce_scatter_add_rms_norm",
                 OP_RMS_NORM_ALL_GATHER: "rms_norm_all_gather"})
MODE_ALL_REDUCE, MODE_REDUCE_SCATTER, MODE_ALL_GATHER = 0, 1, 2
_MODE_OP = {MODE_ALL_REDUCE: OP_ALL_REDUCE_ADD_RMS_NORM,
            MODE_REDUCE_SCATTER: OP_REDUCE_SCATTER_ADD_RMS_NORM,
            MODE_ALL_GATHER: OP_RMS_NORM_ALL_GATHER}
FUSED_ROW_MAX_N = 16384  # whole rows in registers; wider rows take the unfused path


def _fp8_format(dtype: torch.dtype, device: torch.device | None = None) -> tuple[float, int]:
    """(largest finite value, exponent of the smallest normal) of an e4m3 format."""
    if dtype == torch.float8_e4m3fn:
        return 448.0, -6
    if dtype == torch.float8_e4m3fnuz:
        if device is not None and device.type == "cuda" and not torch.version.hip:
            raise TypeError("aiter_dist.all_reduce_add_rms_norm_fp8: float8_e4m3fnuz is AMD's "
                            "(MI300) format; NVIDIA GPUs take torch.float8_e4m3fn")
        return 240.0, -7
    raise TypeError(f"aiter_dist.all_reduce_add_rms_norm_fp8: fp8_dtype must be "
                    f"torch.float8_e4m3fn or torch.float8_e4m3fnuz, got {dtype}")


def default_fp8_dtype() -> torch.dtype:
    """e4m3fn, except on MI300-class GPUs (gfx94x), whose fp8 is e4m3fnuz."""
    if torch.version.hip and torch.cuda.is_available():
        arch = torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName
        if arch.startswith("gfx94"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


# ----------------------------------------------------------------------------- reference

def all_reduce_add_rms_norm_ref(xs, residual, weight, eps=1e-6):
    """From every rank's x: (out, residual_out), in the inputs' dtype via float64."""
    total = torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)
    return add_rms_norm_ref(total, residual, weight, eps)


def reduce_scatter_add_rms_norm_ref(xs, residual, weight, rank, eps=1e-6):
    """From every rank's x (world * m rows along dim 0): this rank's (out, residual_out)."""
    total = torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)
    return add_rms_norm_ref(total.chunk(len(xs), dim=0)[rank], residual, weight, eps)


def rms_norm_all_gather_ref(xs, weight, eps=1e-6):
    """From every rank's shard: the normalized shards concatenated along dim 0."""
    return torch.cat([rms_norm_ref(x, weight, eps) for x in xs], dim=0)


def quantize_rows_fp8_ref(y, fp8_dtype=torch.float8_e4m3fn):
    """Per-row scale ``amax / fp8_max`` and ``y / scale`` rounded to fp8 (PyTorch's rounding)."""
    fp8_max, _ = _fp8_format(fp8_dtype)
    yf = y.float()
    scale = (yf.abs().amax(dim=-1, keepdim=True) / fp8_max).clamp_min(FP8_MIN_SCALE)
    return (yf / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype), scale


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _round_to_fp8_grid(v, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr):
    """``v`` (fp32) rounded to the nearest e4m3 value (ties to even), saturated at FP8_MAX.

    The cast that follows is then exact. Done by hand because Triton's interpreter rounds some
    fp32 -> fp8 casts wrongly (carries out of the mantissa, subnormals); on GPUs the hardware
    conversion rounds the same way, so both paths agree.
    """
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.maximum(e, MIN_EXP)  # below the smallest normal: the subnormal spacing
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv_quantum = ((127 - e + 3) << 23).to(tl.float32, bitcast=True)
    t = a * inv_quantum  # exact, and < 16
    t = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: round to an integer, ties to even
    r = tl.minimum(t * quantum, FP8_MAX)
    return tl.where(v < 0, -r, r)


@triton.jit
def _norm_rows(sf, w, N, eps):
    """(rms_norm(sf) * w in fp32, rstd) of an fp32 row tile (masked columns hold 0)."""
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=1) / N + eps)
    return sf * rstd[:, None] * w, rstd


@triton.jit(do_not_specialize=["seq", "op_id", "dtype_code", "numel", "total", "key", "variant",
                               "rank", "world", "max_spins"])
def _fused_norm_kernel(
    X, R, W, Y, RES_OUT, RSTD, SCALE,  # see the launcher: rows of N, contiguous
    BUF_PTRS, SIG_PTRS, ERR,  # workspace pointer tables [world] and error record
    seq, op_id, dtype_code, numel, total, key, variant,  # launch header (protocol.Header)
    rank, world, max_spins,
    M, N, eps,  # rows (see below), columns, RMSNorm epsilon
    MODE: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    ABORT_POLL: tl.constexpr, HWORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # M: rows of this rank's output (MODE 0), of its shard (MODE 1: X holds world * M rows;
    # MODE 2: Y holds world * M rows). All tensors contiguous, N columns.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = X.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_mask = cols < N
    n_blocks = tl.cdiv(M, BLOCK_M)
    my_buf = _peer_buf(BUF_PTRS, rank, elem_ty, HEADER)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)

    if MODE == 2:
        # Normalize this rank's rows straight into its buffer (the peers gather from there).
        for blk in range(pid, n_blocks, nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            offs = rows.to(tl.int64)[:, None] * N + cols
            mask = (rows < M)[:, None] & col_mask
            sf = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y, rstd = _norm_rows(sf, w, N, eps)
            y = y.to(elem_ty)
            tl.store(my_buf + offs, y, mask=mask)
            tl.store(Y + tl.cast(rank, tl.int64) * M * N + offs, y, mask=mask)
            tl.store(RSTD + rows, rstd, mask=rows < M)
    else:
        if MODE == 1:
            n_chunks = world
        else:
            n_chunks = 1
        for c in range(n_chunks):
            for blk in range(pid, n_blocks, nprog):
                rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
                offs = (c * M + rows).to(tl.int64)[:, None] * N + cols
                mask = (rows < M)[:, None] & col_mask
                tl.store(my_buf + offs, tl.load(X + offs, mask=mask), mask=mask)

    failed, bad = _start(X, BUF_PTRS, SIG_PTRS, ERR, 0, 0, 0, seq, op_id, dtype_code, numel,
                         total, key, variant, rank, world, max_spins, False, MAX_PROGRAMS,
                         MAX_WORLD_, HEADER, ABORT_POLL, HWORDS, 16)

    if failed == 0:
        for blk in range(pid, n_blocks, nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            offs = rows.to(tl.int64)[:, None] * N + cols
            mask = row_mask[:, None] & col_mask
            if MODE == 2:
                for r in range(world):
                    if r != rank:
                        src = _peer_buf(BUF_PTRS, r, elem_ty, HEADER)
                        tl.store(Y + tl.cast(r, tl.int64) * M * N + offs,
                                 tl.load(src + offs, mask=mask, cache_modifier=".cg"), mask=mask)
            else:
                if MODE == 1:
                    src_offs = offs + tl.cast(rank, tl.int64) * M * N
                else:
                    src_offs = offs
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for r in range(world):
                    src = _peer_buf(BUF_PTRS, r, elem_ty, HEADER)
                    acc += tl.load(src + src_offs, mask=mask, other=0.0,
                                   cache_modifier=".cg").to(tl.float32)
                # Round the sum as the collective would, add the residual and round again (to
                # the promoted dtype of x and residual).
                summed = acc.to(elem_ty).to(tl.float32)
                s = (summed + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(
                    RES_OUT.dtype.element_ty)
                tl.store(RES_OUT + offs, s, mask=mask)
                y, rstd = _norm_rows(s.to(tl.float32), w, N, eps)
                tl.store(RSTD + rows, rstd, mask=row_mask)
                if FP8_MAX > 0:
                    amax = tl.max(tl.abs(y), axis=1)
                    # Correctly rounded, as PyTorch divides (a plain "/" is approximate on GPUs).
                    scale = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)),
                                       1e-12)  # FP8_MIN_SCALE
                    scale_b = scale[:, None] + tl.zeros_like(y)  # div_rn: operands of one shape
                    q = _round_to_fp8_grid(tl.div_rn(y, scale_b), FP8_MAX, FP8_MIN_EXP)
                    tl.store(Y + offs, q.to(Y.dtype.element_ty), mask=mask)
                    tl.store(SCALE + rows, scale, mask=row_mask)
                else:
                    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    _report_mismatch(ERR, SIG_PTRS, BUF_PTRS, rank, world, op_id, bad, MAX_PROGRAMS, MAX_WORLD_,
                     HWORDS)
    _finish(SIG_PTRS, BUF_PTRS, ERR, rank, world, max_spins, op_id, failed,
            MAX_PROGRAMS, MAX_WORLD_, ABORT_POLL, HWORDS)


# ----------------------------------------------------------------------------- launchers

def _fused_limit(x2, rows_in_buffer, group, in_pieces=False):
    """Why the fused kernel cannot take this message (None: it can). ``in_pieces``: the caller
    can launch the kernel on row pieces, so only one row has to fit in the workspace."""
    nbytes = rows_in_buffer * x2.shape[1] * x2.element_size()
    need = x2.shape[1] * x2.element_size() if in_pieces else nbytes
    room = workspace_data_bytes(group, x2.device)
    if x2.shape[1] > FUSED_ROW_MAX_N or need > room:
        return (f"rows of {x2.shape[1]} or {nbytes} B exceed the fused kernel's limits "
                f"({FUSED_ROW_MAX_N} columns, a {room} B workspace)")
    return None


def _route_fused(op, mode, x2, rows_in_buffer, group, algo, composed, x_shape, in_pieces=False):
    if algo not in ("auto", "one_shot", "fallback"):
        raise ValueError(f"aiter_dist.{op}: algo must be 'auto', 'one_shot' or 'fallback', "
                         f"got {algo!r}")
    group = resolve_group(group)
    limit = _fused_limit(x2, rows_in_buffer, group, in_pieces)
    return route(op, _MODE_OP[mode], "fused_norm", x2, group, algo,
                 nbytes=rows_in_buffer * x2.shape[1] * x2.element_size(), total=x2.numel(),
                 shape=x_shape, kernel_limit=limit, composed=composed)


def _launch_fused(mode, ws, call, x2, r2, weight, y, res_out, rstd, scale, m, eps,
                  fp8_dtype=None, plan=None):
    N = x2.shape[1]
    cpu = x2.device.type == "cpu"
    block_n = next_pow2(N)
    block_m = max(1, min((16384 if cpu else 4096) // block_n, 64))
    programs = max(1, min(cdiv(max(m, 1), block_m), max_grid(ws)))
    fp8_max, fp8_min_exp = _fp8_format(fp8_dtype) if fp8_dtype is not None else (0.0, 0)
    dummy = rstd  # for pointers a mode does not use
    return launch_collective(
        _fused_norm_kernel, programs, ws, call, m * N, N * 4 + mode, plan=plan,
        tensors=(x2, r2 if r2 is not None else dummy, weight, y,
                 res_out if res_out is not None else dummy, rstd,
                 scale if scale is not None else dummy),
        scalars=(m, N, eps), MODE=mode, FP8_MAX=fp8_max, FP8_MIN_EXP=fp8_min_exp,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=1 if cpu else min(max(block_m * block_n // 512, 4), 16))


# plan_key(x, group, op, algo, eps, fp8 dtype, residual's and weight's signatures) -> the
# CollectivePlan of a fused call in one launch: x and residual contiguous, no copy in view;
# extra = (rows, the outputs' dtypes or shapes).
_plans = plan_cache()


def _fused_plan(op, x, residual, weight, group, algo, eps, fp8_dtype):
    """(key, the plan if one may serve this call now)."""
    try:
        rest = (op, algo, float(eps), fp8_dtype,
                None if residual is None else signature(residual), signature(weight))
    except (AttributeError, TypeError, ValueError):  # not tensors: the checks name the problem
        return None, None
    return find_plan(_plans, x, group, *rest, aligned=(residual, weight))


def _keep_plan(plan, key, x, residual, x2, r2, extra):
    """Keep a one-launch call's plan where the launch read x and residual themselves."""
    if plan is not None and key is not None and x2.data_ptr() == x.data_ptr() \
            and x.is_contiguous() and (residual is None or (
                r2.data_ptr() == residual.data_ptr() and residual.is_contiguous())):
        plan.extra = extra
        _plans[key] = plan


def _check_fused_inputs(op, x, weight, residual=None):
    _check_norm_inputs(op, x, weight, None)
    check_comm_input(op, "x", x, ndim_min=1)
    if residual is not None:
        check_comm_input(op, "residual", residual, ndim_min=1)
        if residual.device != x.device:
            raise ValueError(f"aiter_dist.{op}: residual is on {residual.device} but x is on "
                             f"{x.device}; move them to one device")


def _quantize_rows_fp8_torch(res_out2, weight, rstd, fp8_dtype):
    y = res_out2.float() * rstd[:, None] * weight.float()
    q, scale = quantize_rows_fp8_ref(y, fp8_dtype)
    return q, scale.view(-1)


def all_reduce_add_rms_norm_fwd(x, residual, weight, eps, group, algo="auto", fp8_dtype=None):
    """(out, residual_out, rstd, scale or None). The fused kernel when it applies, else
    all_reduce then add_rms_norm (recorded). ``fp8_dtype``: quantize ``out`` per row."""
    op = "all_reduce_add_rms_norm" + ("_fp8" if fp8_dtype is not None else "")
    key, plan = _fused_plan(op, x, residual, weight, group, algo, eps, fp8_dtype)
    if plan is not None:
        M, y_dtype, res_dtype = plan.extra
        y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
        res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        scale = torch.empty(M, dtype=torch.float32, device=x.device) if fp8_dtype else None
        plan(x, residual, weight, y, res_out, rstd, rstd if scale is None else scale)
        return y, res_out, rstd, None if scale is None else scale.view(*x.shape[:-1], 1)
    _check_fused_inputs(op, x, weight, residual)
    if residual.shape != x.shape:
        raise ValueError(f"aiter_dist.{op}: residual shape {tuple(residual.shape)} differs from x "
                         f"shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    r2 = residual.reshape(-1, x.shape[-1]).contiguous()
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    M = x2.shape[0]
    r = _route_fused(op, MODE_ALL_REDUCE, x2, M, group, algo, "all_reduce + add_rms_norm",
                     x.shape, in_pieces=True)
    if r.path != "one_shot":
        total = all_reduce_raw(x2, group, "fallback" if algo == "fallback" else "auto") \
            if r.path != "identity" else x2
        y, res_out, rstd = rms_norm_fwd(total.to(res_dtype), weight, eps,
                                        residual=r2.to(res_dtype))
        scale = None
        if fp8_dtype is not None:
            y, scale = _quantize_rows_fp8_torch(res_out, weight, rstd, fp8_dtype)
    else:
        y = torch.empty_like(x2, dtype=fp8_dtype or res_dtype)
        res_out = torch.empty_like(x2, dtype=res_dtype)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        scale = torch.empty(M, dtype=torch.float32, device=x.device) if fp8_dtype else None
        # Rows are independent: a message larger than the workspace goes in row pieces.
        piece = max(1, r.ws.data_bytes // (x2.shape[1] * x2.element_size()))
        if M <= piece:
            plan = _launch_fused(MODE_ALL_REDUCE, r.ws, r.call, x2, r2, weight, y, res_out,
                                 rstd, scale, M, eps, fp8_dtype, plan=(op, "one_shot"))
            _keep_plan(plan, key, x, residual, x2, r2, (M, y.dtype, res_dtype))
        else:
            for a, b in pieces(M, piece):
                _launch_fused(MODE_ALL_REDUCE, r.ws, r.call, x2[a:b], r2[a:b], weight, y[a:b],
                              res_out[a:b], rstd[a:b],
                              scale[a:b] if scale is not None else None, b - a, eps, fp8_dtype)
    if scale is not None:
        scale = scale.view(*x.shape[:-1], 1)
    return y.view(x.shape), res_out.view(x.shape), rstd, scale


def _check_tokens_first(op, x):
    if x.dim() < 2:
        raise ValueError(f"aiter_dist.{op}: x must be (tokens, ..., hidden), got shape "
                         f"{tuple(x.shape)}")


def reduce_scatter_add_rms_norm_fwd(x, residual, weight, eps, group, algo="auto"):
    """(out, residual_out, rstd) on this rank's shard of dim 0."""
    op = "reduce_scatter_add_rms_norm"
    key, plan = _fused_plan(op, x, residual, weight, group, algo, eps, None)
    if plan is not None:
        m, res_dtype, shard_shape = plan.extra
        y = torch.empty(shard_shape, dtype=res_dtype, device=x.device)
        res_out = torch.empty(shard_shape, dtype=res_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        plan(x, residual, weight, y, res_out, rstd, rstd)
        return y, res_out, rstd
    _check_fused_inputs(op, x, weight, residual)
    _check_tokens_first(op, x)
    world = dist.get_world_size(resolve_group(group))
    if x.shape[0] % world:
        raise ValueError(f"aiter_dist.{op}: x.shape[0]={x.shape[0]} is not divisible by the world "
                         f"size {world}; pad the sequence to a multiple of {world}")
    shard_shape = (x.shape[0] // world, *x.shape[1:])
    if tuple(residual.shape) != shard_shape:
        raise ValueError(f"aiter_dist.{op}: residual must be this rank's shard of shape "
                         f"{shard_shape} (x.shape[0] / world size), got {tuple(residual.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    r2 = residual.reshape(-1, x.shape[-1]).contiguous()
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    m = r2.shape[0]
    r = _route_fused(op, MODE_REDUCE_SCATTER, x2, m * world, group, algo,
                     "reduce_scatter + add_rms_norm", x.shape)
    if r.path != "one_shot":
        part = reduce_scatter_raw(x2, 0, group, "fallback" if algo == "fallback" else "auto") \
            if r.path != "identity" else x2
        y, res_out, rstd = rms_norm_fwd(part.to(res_dtype), weight, eps,
                                        residual=r2.to(res_dtype))
    else:
        y = torch.empty_like(r2, dtype=res_dtype)
        res_out = torch.empty_like(r2, dtype=res_dtype)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        plan = _launch_fused(MODE_REDUCE_SCATTER, r.ws, r.call, x2, r2, weight, y, res_out, rstd,
                             None, m, eps, plan=(op, "one_shot"))
        _keep_plan(plan, key, x, residual, x2, r2, (m, res_dtype, shard_shape))
    return y.view(shard_shape), res_out.view(shard_shape), rstd


def rms_norm_all_gather_fwd(x, weight, eps, group, algo="auto"):
    """(out gathered along dim 0, rstd of this rank's rows)."""
    op = "rms_norm_all_gather"
    key, plan = _fused_plan(op, x, None, weight, group, algo, eps, None)
    if plan is not None:
        m, out_shape = plan.extra
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        plan(x, rstd, weight, out, rstd, rstd, rstd)
        return out, rstd
    _check_fused_inputs(op, x, weight)
    _check_tokens_first(op, x)
    world = dist.get_world_size(resolve_group(group))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    out_shape = (x.shape[0] * world, *x.shape[1:])
    r = _route_fused(op, MODE_ALL_GATHER, x2, m, group, algo, "rms_norm + all_gather", x.shape)
    if r.path != "one_shot":
        y, _, rstd = rms_norm_fwd(x2, weight, eps)
        out = all_gather_raw(y, 0, group, "fallback" if algo == "fallback" else "auto") \
            if r.path != "identity" else y
    else:
        out = torch.empty(m * world, x2.shape[1], dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        plan = _launch_fused(MODE_ALL_GATHER, r.ws, r.call, x2, None, weight, out, None, rstd,
                             None, m, eps, plan=(op, "one_shot"))
        _keep_plan(plan, key, x, None, x2, None, (m, out_shape))
    return out.view(out_shape), rstd


def _sum_weight_grad(dw32, weight, group):
    """A sequence-parallel weight's gradient: the shards' fp32 sums added over the group."""
    if dist.get_world_size(group) > 1:
        dw32 = all_reduce_raw(dw32.contiguous(), group)
    return dw32.to(weight.dtype)


# ----------------------------------------------------------------------------- autograd

class AllReduceAddRMSNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, group, algo):
        y, res_out, rstd, _ = all_reduce_add_rms_norm_fwd(x, residual, weight, eps, group, algo)
        ctx.save_for_backward(res_out, weight, rstd)
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype
        return y, res_out

    @staticmethod
    def backward(ctx, dy, dres_out):
        res_out, weight, rstd = ctx.saved_tensors
        dx, dw = add_rms_norm_bwd(dy, dres_out, res_out, weight, rstd,
                                  need_dw=ctx.needs_input_grad[2])
        # The all-reduce passes the gradient through unchanged (identity backward).
        return dx.to(ctx.x_dtype), dx.to(ctx.r_dtype), dw, None, None, None


class AllReduceAddRMSNormFP8Func(torch.autograd.Function):
    """The fp8 ``out`` and its scales carry no gradient (an fp8 GEMM downstream defines its own
    backward); ``residual_out`` does, to ``x`` and ``residual`` alike."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, group, algo, fp8_dtype):
        y, res_out, _, scale = all_reduce_add_rms_norm_fwd(x, residual, weight, eps, group, algo,
                                                           fp8_dtype)
        ctx.mark_non_differentiable(y, scale)
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype
        return y, scale, res_out

    @staticmethod
    def backward(ctx, dy, dscale, dres_out):
        return (dres_out.to(ctx.x_dtype), dres_out.to(ctx.r_dtype), None, None, None, None,
                None)


class ReduceScatterAddRMSNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, group, algo):
        y, res_out, rstd = reduce_scatter_add_rms_norm_fwd(x, residual, weight, eps, group, algo)
        ctx.save_for_backward(res_out, weight, rstd)
        ctx.args = (group, algo)
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype
        return y, res_out

    @staticmethod
    def backward(ctx, dy, dres_out):
        res_out, weight, rstd = ctx.saved_tensors
        group, algo = ctx.args
        group = resolve_group(group)
        if dy is None:
            dy = torch.zeros_like(res_out)
        dshard, dw = rms_norm_bwd(dy, res_out, weight, rstd, dresidual=dres_out, dw_fp32=True)
        # reduce_scatter's backward gathers the shards' gradients.
        dx = all_gather_raw(dshard.to(ctx.x_dtype).contiguous(), 0, group, algo)
        return (dx, dshard.to(ctx.r_dtype), _sum_weight_grad(dw, weight, group), None, None,
                None)


class RMSNormAllGatherFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, group, algo):
        out, rstd = rms_norm_all_gather_fwd(x, weight, eps, group, algo)
        ctx.save_for_backward(x, weight, rstd)
        ctx.args = (group, algo)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        group, algo = ctx.args
        group = resolve_group(group)
        # all_gather's backward reduce-scatters the gradient (each rank's is partial).
        dshard = reduce_scatter_raw(dout.contiguous(), 0, group, algo)
        dx, dw = rms_norm_bwd(dshard, x, weight, rstd, dw_fp32=True)
        return dx, _sum_weight_grad(dw, weight, group), None, None, None


# ----------------------------------------------------------------------------- torch.library

# The fused ops as torch.compile sees them: forward ops that also return what their backward
# needs (rstd), and backwards made of the other ops (the norm's backward kernel, collectives).

def _promoted(x, residual):
    return torch.promote_types(x.dtype, residual.dtype)


def _rows_of(shape) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


@torch.library.custom_op("aiter_dist::all_reduce_add_rms_norm", mutates_args=())
def _all_reduce_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float, group_name: str, algo: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, res_out, rstd, _ = all_reduce_add_rms_norm_fwd(x, residual, weight, eps,
                                                      group_of(group_name), algo)
    return y, res_out, rstd


@_all_reduce_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, group_name, algo):
    dt = _promoted(x, residual)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt),
            x.new_empty(_rows_of(x.shape), dtype=torch.float32))


def _all_reduce_norm_setup(ctx, inputs, output):
    x, residual, weight = inputs[:3]
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype


def _all_reduce_norm_backward(ctx, dy, dres_out, drstd):
    res_out, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.aiter_dist.rms_norm_bwd(dy, res_out, weight, rstd, dres_out, False)
    # The all-reduce passes the gradient through unchanged (identity backward).
    return dx.to(ctx.x_dtype), dx.to(ctx.r_dtype), dw, None, None, None


torch.library.register_autograd("aiter_dist::all_reduce_add_rms_norm",
                                _all_reduce_norm_backward, setup_context=_all_reduce_norm_setup)


@torch.library.custom_op("aiter_dist::all_reduce_add_rms_norm_fp8", mutates_args=())
def _all_reduce_add_rms_norm_fp8_op(x: torch.Tensor, residual: torch.Tensor,
                                    weight: torch.Tensor, eps: float, group_name: str, algo: str,
                                    fp8_dtype: torch.dtype
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, res_out, _, scale = all_reduce_add_rms_norm_fwd(x, residual, weight, eps,
                                                       group_of(group_name), algo, fp8_dtype)
    return y, scale, res_out


@_all_reduce_add_rms_norm_fp8_op.register_fake
def _(x, residual, weight, eps, group_name, algo, fp8_dtype):
    return (x.new_empty(x.shape, dtype=fp8_dtype),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
            x.new_empty(x.shape, dtype=_promoted(x, residual)))


def _fp8_setup(ctx, inputs, output):
    ctx.x_dtype, ctx.r_dtype = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(output[0], output[1])


torch.library.register_autograd(
    "aiter_dist::all_reduce_add_rms_norm_fp8",
    lambda ctx, dy, dscale, dres: (dres.to(ctx.x_dtype), dres.to(ctx.r_dtype)) + (None,) * 5,
    setup_context=_fp8_setup)


@torch.library.custom_op("aiter_dist::reduce_scatter_add_rms_norm", mutates_args=())
def _reduce_scatter_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor,
                                    weight: torch.Tensor, eps: float, group_name: str, algo: str
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reduce_scatter_add_rms_norm_fwd(x, residual, weight, eps, group_of(group_name), algo)


@_reduce_scatter_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, group_name, algo):
    dt = _promoted(x, residual)
    return (residual.new_empty(residual.shape, dtype=dt),
            residual.new_empty(residual.shape, dtype=dt),
            x.new_empty(_rows_of(residual.shape), dtype=torch.float32))


def _reduce_scatter_norm_setup(ctx, inputs, output):
    x, residual, weight, _, group_name, algo = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.x_dtype, ctx.r_dtype, ctx.args = x.dtype, residual.dtype, (group_name, algo)


def _reduce_scatter_norm_backward(ctx, dy, dres_out, drstd):
    res_out, weight, rstd = ctx.saved_tensors
    group_name, algo = ctx.args
    dshard, dw = torch.ops.aiter_dist.rms_norm_bwd(dy, res_out, weight, rstd, dres_out, True)
    # reduce_scatter's backward gathers the shards' gradients; the weight's is summed.
    dx = torch.ops.aiter_dist.all_gather(dshard.to(ctx.x_dtype).contiguous(), 0, group_name, algo)
    dw = torch.ops.aiter_dist.all_reduce(dw, group_name, "auto").to(weight.dtype)
    return dx, dshard.to(ctx.r_dtype), dw, None, None, None


torch.library.register_autograd("aiter_dist::reduce_scatter_add_rms_norm",
                                _reduce_scatter_norm_backward,
                                setup_context=_reduce_scatter_norm_setup)


@torch.library.custom_op("aiter_dist::rms_norm_all_gather", mutates_args=())
def _rms_norm_all_gather_op(x: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str,
                            algo: str) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_all_gather_fwd(x, weight, eps, group_of(group_name), algo)


@_rms_norm_all_gather_op.register_fake
def _(x, weight, eps, group_name, algo):
    world = group_of(group_name).size()
    return (x.new_empty((x.shape[0] * world, *x.shape[1:])),
            x.new_empty(_rows_of(x.shape), dtype=torch.float32))


def _norm_gather_setup(ctx, inputs, output):
    x, weight, _, group_name, algo = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.args = (group_name, algo)


def _norm_gather_backward(ctx, dout, drstd):
    x, weight, rstd = ctx.saved_tensors
    group_name, algo = ctx.args
    # all_gather's backward reduce-scatters the gradient (each rank's is partial).
    dshard = torch.ops.aiter_dist.reduce_scatter(dout.contiguous(), 0, group_name, algo)
    dx, dw = torch.ops.aiter_dist.rms_norm_bwd(dshard, x, weight, rstd, None, True)
    return dx, torch.ops.aiter_dist.all_reduce(dw, group_name, "auto").to(weight.dtype), None, \
        None, None


torch.library.register_autograd("aiter_dist::rms_norm_all_gather", _norm_gather_backward,
                                setup_context=_norm_gather_setup)


# ----------------------------------------------------------------------------- functional API

def all_reduce_add_rms_norm(x, residual, weight, eps=1e-6, group=None, *, algo="auto"):
    """Sum ``x`` over the group, add the residual and RMSNorm the result, in one launch::

        residual_out = all_reduce(x) + residual
        out = residual_out * rsqrt(mean(residual_out**2, dim=-1) + eps) * weight

    (``weight`` is applied once, as in ``aiter_dist.rms_norm(residual_out, weight, eps)``.) The
    place where a row-parallel layer's partial output meets the residual stream and the next
    norm.

    Args:
        x: (..., N), this rank's partial sum; float32, float16 or bfloat16, on this rank's
            device.
        residual: x's shape, the same on every rank (the replicated residual stream); any of
            those dtypes, possibly not x's (an fp32 residual stream under a bf16 autocast).
        weight: (N,), the same on every rank.
        eps: added to the mean square.
        group: the process group (default: the world).
        algo: ``"auto"`` (the fused kernel for small messages, by the table in
            ``comm/policy.py``), ``"one_shot"`` (the fused kernel) or ``"fallback"`` (the
            unfused composition over torch.distributed).

    Returns:
        ``(out, residual_out)``, x's shape, in the promoted dtype of x and residual.

    Every rank must call it with the same shape and dtype of ``x`` (and the same ``algo``);
    ranks that differ get a ``RuntimeError`` on every rank. ``last_path("all_reduce_add_rms_norm")``
    names the path: ``"one_shot"`` (fused), ``"all_reduce + add_rms_norm"`` (unfused, for example
    for rows wider than 16384 columns, messages past the table, ``algo="fallback"`` or groups
    spanning hosts) or ``"identity"`` (a group of one).

    Autograd: the all-reduce's backward is the identity (Megatron's convention), so ``x`` and
    ``residual`` both receive the gradient of ``residual_out`` plus the norm's input gradient,
    each in its own dtype; ``weight`` receives this rank's gradient (the same on every rank when
    the inputs are replicated, as in tensor parallelism).

    Numerics: the sum is taken in rank order with fp32 accumulation and rounded to x's dtype,
    as ``all_reduce`` would, then the residual is added and rounded to the promoted dtype; on
    the kernel path every rank holds bitwise the same ``out`` and ``residual_out``, and
    ``residual_out`` equals the unfused composition's bit for bit (``out`` is within a few ulps
    of it: the sum of squares is reduced in another order). The unfused path has
    torch.distributed's numerics.
    """
    if compiling():
        out, res_out, _ = torch.ops.aiter_dist.all_reduce_add_rms_norm(
            x, residual, weight, eps, group_name_of(group), algo)
        return out, res_out
    return AllReduceAddRMSNormFunc.apply(x, residual, weight, eps, group, algo)


def all_reduce_add_rms_norm_fp8(x, residual, weight, eps=1e-6, group=None, *, fp8_dtype=None,
                                algo="auto"):
    """:func:`all_reduce_add_rms_norm` with ``out`` quantized to fp8 (e4m3), one fp32 scale per
    token (row), ready for a rowwise-scaled fp8 GEMM.

    Arguments, rank rules and paths as :func:`all_reduce_add_rms_norm`
    (``last_path("all_reduce_add_rms_norm_fp8")``); ``fp8_dtype`` is ``torch.float8_e4m3fn``
    (the default) or ``torch.float8_e4m3fnuz`` (the default on MI300-class GPUs, refused on
    NVIDIA ones).

    Returns:
        ``(out, scale, residual_out)``: ``out`` has x's shape in ``fp8_dtype``; ``scale`` is
        float32 of shape ``(*x.shape[:-1], 1)`` (the layout ``torch._scaled_mm`` takes for
        rowwise scales), ``amax(|y|) / fp8_max`` of each normalized row ``y`` (at least 1e-12),
        so ``out.float() * scale`` approximates ``y`` within half an fp8 step; ``residual_out``
        as in :func:`all_reduce_add_rms_norm`.

    Autograd: only ``residual_out`` carries a gradient, to ``x`` and ``residual`` alike; ``out``
    and ``scale`` are not differentiable, so ``weight`` receives none (an fp8 GEMM downstream
    defines its own backward).

    Numerics: ``residual_out`` as in :func:`all_reduce_add_rms_norm`; the quantization rounds to
    nearest (ties to even) and saturates at the format's largest value, the same bits on every
    rank on the kernel path.
    """
    fp8_dtype = fp8_dtype or default_fp8_dtype()
    _fp8_format(fp8_dtype, x.device if isinstance(x, torch.Tensor) else None)
    if compiling():
        return torch.ops.aiter_dist.all_reduce_add_rms_norm_fp8(
            x, residual, weight, eps, group_name_of(group), algo, fp8_dtype)
    return AllReduceAddRMSNormFP8Func.apply(x, residual, weight, eps, group, algo, fp8_dtype)


def reduce_scatter_add_rms_norm(x, residual, weight, eps=1e-6, group=None, *, algo="auto"):
    """Sequence parallel: reduce-scatter ``x`` over the tokens, add this rank's residual shard and
    RMSNorm it, in one launch::

        residual_out = reduce_scatter(x, dim=0) + residual
        out = residual_out * rsqrt(mean(residual_out**2, dim=-1) + eps) * weight

    Args:
        x: (tokens, ..., N), this rank's partial sum over all tokens; ``tokens`` divisible by
            the world size; float32, float16 or bfloat16.
        residual: this rank's shard of the residual stream, (tokens / world, ..., N): rows
            ``rank * tokens / world`` onwards; its dtype may differ from x's.
        weight: (N,), the same on every rank.
        eps, group, algo: as in :func:`all_reduce_add_rms_norm`.

    Returns:
        ``(out, residual_out)``, both this rank's shard (tokens / world, ..., N) in the promoted
        dtype of x and residual.

    Every rank must pass the same shape and dtype of ``x``; ranks that differ get a
    ``RuntimeError`` on every rank. Paths: ``last_path("reduce_scatter_add_rms_norm")`` is
    ``"one_shot"`` (fused), ``"reduce_scatter + add_rms_norm"`` or ``"identity"``.

    Autograd: the reduce-scatter's backward is an all-gather, so ``x`` receives the gathered
    shard gradients (all tokens) and ``residual`` this rank's shard gradient. Each rank sees
    only its tokens, so ``weight``'s gradient is summed over the group: every rank holds the
    same full gradient.

    Numerics: sums in rank order with fp32 accumulation, rounded to x's dtype, then the
    residual added and rounded to the promoted dtype; on the kernel path ``residual_out`` equals
    the unfused composition's bit for bit (``out`` is within a few ulps of it). The unfused path
    has torch.distributed's numerics.
    """
    if compiling():
        out, res_out, _ = torch.ops.aiter_dist.reduce_scatter_add_rms_norm(
            x, residual, weight, eps, group_name_of(group), algo)
        return out, res_out
    return ReduceScatterAddRMSNormFunc.apply(x, residual, weight, eps, group, algo)


def rms_norm_all_gather(x, weight, eps=1e-6, group=None, *, algo="auto"):
    """Sequence parallel: RMSNorm this rank's token shard and all-gather the result, in one
    launch::

        out = all_gather(x * rsqrt(mean(x**2, dim=-1) + eps) * weight, dim=0)

    Args:
        x: (tokens_per_rank, ..., N), this rank's shard; float32, float16 or bfloat16.
        weight: (N,), the same on every rank.
        eps, group, algo: as in :func:`all_reduce_add_rms_norm`.

    Returns:
        ``out`` of shape (world * tokens_per_rank, ..., N) in x's dtype: rank ``r``'s normalized
        rows at ``r * tokens_per_rank`` onwards, the same tensor on every rank.

    Every rank must pass the same shape and dtype; ranks that differ get a ``RuntimeError`` on
    every rank. Paths: ``last_path("rms_norm_all_gather")`` is ``"one_shot"`` (fused),
    ``"rms_norm + all_gather"`` or ``"identity"``.

    Autograd: the all-gather's backward is a reduce-scatter (each rank's gradient of the
    gathered tensor is partial), then the norm's backward on this rank's rows; ``weight``'s
    gradient is summed over the group, so every rank holds the same full gradient.

    Numerics: each rank normalizes its own rows (fp32 statistics) and the gather copies bits, so
    every rank holds bitwise the same ``out``.
    """
    if compiling():
        return torch.ops.aiter_dist.rms_norm_all_gather(x, weight, eps, group_name_of(group),
                                                        algo)[0]
    return RMSNormAllGatherFunc.apply(x, weight, eps, group, algo)


__all__ = ["all_reduce_add_rms_norm", "all_reduce_add_rms_norm_fp8",
           "reduce_scatter_add_rms_norm", "rms_norm_all_gather", "all_reduce_add_rms_norm_ref",
           "reduce_scatter_add_rms_norm_ref", "rms_norm_all_gather_ref", "quantize_rows_fp8_ref"]
