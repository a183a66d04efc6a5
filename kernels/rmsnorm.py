"""RMSNorm and fused residual-add + RMSNorm, forward and backward.

    rms_norm(x, w)         = x * rsqrt(mean(x^2) + eps) * w
    add_rms_norm(x, r, w)  = (rms_norm(x + r, w), x + r)

Statistics are fp32 whatever the input dtype; the output takes ``x``'s dtype and ``weight`` may be
stored in another dtype (fp32 master weights under autocast). ``residual_out`` is rounded to
``x``'s dtype before it is normalized, so ``out == rms_norm(residual_out)`` holds exactly.

Rows up to ``ONE_PASS_MAX_N`` columns are held in registers (one read of x, one write of y); wider
rows take a two-pass loop over column chunks. The backward writes one fp32 partial of dweight per
program and sums them afterwards in a fixed order, so it is deterministic.

float64 inputs and zero-size inputs (no rows, or rows of 0 columns) take a PyTorch path with the
same contract (float64 statistics for float64), recorded as ``last_path(op) == "torch"``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._runtime import (FLOAT_DTYPES, INTERPRETED, cdiv, check_last_dim_contiguous,
                       check_same_device, check_tensor, compiling, launch, next_pow2,
                       plan_cache, plan_device, plan_launch, record_path,
                       signature, takes_torch_path)

ONE_PASS_MAX_N = 65536


# ----------------------------------------------------------------------------- reference

def rms_norm_ref(x, weight, eps=1e-6):
    """Plain PyTorch RMSNorm with statistics in fp32 (or fp64 for fp64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps=1e-6):
    residual_out = x + residual
    return rms_norm_ref(residual_out, weight, eps), residual_out


def _acc_dtype(*tensors):
    """fp32 statistics, or fp64 where any input is fp64 (the reference path's precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rms_norm_fwd_torch(x2, weight, eps, r2):
    """The kernels' contract in PyTorch ops: for CPU tensors on GPU machines, float64, and
    zero-size inputs."""
    acc = _acc_dtype(x2, weight)
    res_out = (x2.to(acc) + r2.to(acc)).to(x2.dtype) if r2 is not None else None
    src = (res_out if res_out is not None else x2).to(acc)
    rstd = torch.rsqrt(src.pow(2).mean(-1) + eps)
    return (src * rstd[:, None] * weight.to(acc)).to(x2.dtype), res_out, rstd


def _rms_norm_bwd_torch(dy2, x2, weight, rstd, dres2):
    acc = _acc_dtype(x2, weight)
    xhat = x2.to(acc) * rstd[:, None]
    wdy = dy2.to(acc) * weight.to(acc)
    dx = (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)) * rstd[:, None]
    if dres2 is not None:
        dx = dx + dres2.to(acc)
    return dx.to(x2.dtype), (dy2.to(acc) * xhat).sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RES_OUT, RSTD,
    M, N, stride_x, stride_r, stride_y, stride_res, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, EVEN: tl.constexpr, OFFSETS_64: tl.constexpr,
    STORE_RSTD: tl.constexpr = True,
):
    # One block of rows per program. EVEN: the block tiles the tensor exactly, so no masks.
    # OFFSETS_64: element offsets exceed int32 (else 32-bit address arithmetic, cheaper).
    # (A persistent grid walking row blocks was never faster on H200: bench_norm.py --sweep.)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if OFFSETS_64:
        rows64 = rows.to(tl.int64)[:, None]
    else:
        rows64 = rows[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    if (NUM_CHUNKS == 1) and (not HAS_RESIDUAL):
        # Read the rows twice, as Inductor's fastest schedule does: the sum of squares from a
        # read kept in L2 (evict_last), then the normalize from an L2 re-read (evict_first), so
        # no row has to stay in registers and 16 warps fit. H200, 32768x8192 bf16: 253 us
        # against 260 for the register-resident version (bench_norm.py).
        mask = row_mask[:, None] & (cols < N)
        ptrs = X + rows64 * stride_x + cols
        if EVEN:
            x = tl.load(ptrs, eviction_policy="evict_last").to(tl.float32)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        if EVEN:
            x = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
            w = tl.load(W + cols, eviction_policy="evict_last").to(tl.float32)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            w = tl.load(W + cols, mask=cols < N, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = (x * rstd[:, None] * w).to(Y.dtype.element_ty)
        if EVEN:
            tl.store(Y + rows64 * stride_y + cols, y)
        else:
            tl.store(Y + rows64 * stride_y + cols, y, mask=mask)
    elif NUM_CHUNKS == 1:
        # With a residual, the sum x + r is written out anyway: keep it in registers.
        mask = row_mask[:, None] & (cols < N)
        if EVEN:
            x = tl.load(X + rows64 * stride_x + cols).to(tl.float32)
            w = tl.load(W + cols).to(tl.float32)
        else:
            x = tl.load(X + rows64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        r = tl.load(R + rows64 * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(RES_OUT.dtype.element_ty)
        if EVEN:
            tl.store(RES_OUT + rows64 * stride_res + cols, s)
        else:
            tl.store(RES_OUT + rows64 * stride_res + cols, s, mask=mask)
        x = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = (x * rstd[:, None] * w).to(Y.dtype.element_ty)
        if EVEN:
            tl.store(Y + rows64 * stride_y + cols, y)
        else:
            tl.store(Y + rows64 * stride_y + cols, y, mask=mask)
    else:
        # Wide rows: pass 1 accumulates the sum of squares (writing residual_out on the way),
        # pass 2 re-reads the (now final) input and normalizes.
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            ccols = c * BLOCK_N + cols
            mask = row_mask[:, None] & (ccols < N)
            x = tl.load(X + rows64 * stride_x + ccols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + rows64 * stride_r + ccols, mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(RES_OUT.dtype.element_ty)
                tl.store(RES_OUT + rows64 * stride_res + ccols, s, mask=mask)
                x = s.to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(sq / N + eps)
        for c in range(NUM_CHUNKS):
            ccols = c * BLOCK_N + cols
            mask = row_mask[:, None] & (ccols < N)
            if HAS_RESIDUAL:
                x = tl.load(RES_OUT + rows64 * stride_res + ccols, mask=mask,
                            other=0.0).to(tl.float32)
            else:
                x = tl.load(X + rows64 * stride_x + ccols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + ccols, mask=ccols < N, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w
            tl.store(Y + rows64 * stride_y + ccols, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_RSTD:  # (the backward's input; a call without autograd has no use for it)
        tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY, DRES, DX, DW_PARTIAL, RSTD,
    M, N, stride_x, stride_dy, stride_dres, stride_dx, rows_per_program,
    HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, NEED_DW: tl.constexpr,
):
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_rows dy * xhat (NEED_DW: else
    # DW_PARTIAL is never touched)
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)[None, :]
    dw_row = DW_PARTIAL + pid.to(tl.int64) * N
    if NUM_CHUNKS == 1:
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            mask = row_mask[:, None] & col_mask
            x = tl.load(X + rows64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            xhat = x * rstd
            wdy = dy * w
            c = tl.sum(xhat * wdy, axis=1)[:, None] / N
            dx = (wdy - xhat * c) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + rows64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += tl.sum(dy * xhat, axis=0)[None, :]
        if NEED_DW:
            tl.store(dw_row + cols, dw, mask=col_mask)
    else:
        # Wide rows: per row block, pass 1 reduces mean(dy*w*xhat) over column chunks, pass 2
        # writes dx and accumulates dw into this program's own partial row (no atomics).
        if NEED_DW:
            for c in range(NUM_CHUNKS):
                ccols = c * BLOCK_N + cols
                tl.store(dw_row + ccols, tl.zeros([1, BLOCK_N], dtype=tl.float32), mask=ccols < N)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                ccols = c * BLOCK_N + cols
                mask = row_mask[:, None] & (ccols < N)
                x = tl.load(X + rows64 * stride_x + ccols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64 * stride_dy + ccols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + ccols, mask=ccols < N, other=0.0).to(tl.float32)
                acc += tl.sum(x * rstd * dy * w, axis=1)
            cmean = acc[:, None] / N
            for c in range(NUM_CHUNKS):
                ccols = c * BLOCK_N + cols
                mask = row_mask[:, None] & (ccols < N)
                x = tl.load(X + rows64 * stride_x + ccols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64 * stride_dy + ccols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + ccols, mask=ccols < N, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (dy * w - xhat * cmean) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + rows64 * stride_dres + ccols, mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(DX + rows64 * stride_dx + ccols, dx.to(DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    dw_prev = tl.load(dw_row + ccols, mask=ccols < N, other=0.0)
                    tl.store(dw_row + ccols, dw_prev + tl.sum(dy * xhat, axis=0)[None, :],
                             mask=ccols < N)


@triton.jit
def _dw_reduce_kernel(DW_PARTIAL, DW, programs, N, BLOCK_P: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    # dweight: the backward programs' fp32 partial rows summed in a fixed order (deterministic),
    # rounded once to DW's dtype; one launch where sum + cast took two.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, programs, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)[:, None]
        acc += tl.load(DW_PARTIAL + rows.to(tl.int64) * N + cols,
                       mask=(rows < programs) & (cols < N), other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0)[None, :].to(DW.dtype.element_ty), mask=cols < N)


# ----------------------------------------------------------------------------- launchers

def _block_n(N: int, max_n: int) -> tuple[int, int]:
    if N <= max_n:
        return next_pow2(N), 1
    return 4096, cdiv(N, 4096)


def _fwd_config(M: int, N: int, device: torch.device, max_n: int = ONE_PASS_MAX_N,
                residual: bool = False):
    """(BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps) for the forward."""
    block_n, chunks = _block_n(N, max_n)
    if device.type == "cpu":
        # The interpreter pays per program and per op, not per element: few, large programs.
        block_m = min(next_pow2(cdiv(M, 4)), max(1, 16384 // block_n))
        return max(block_m, 1), block_n, chunks, 1
    if chunks > 1:
        return 1, block_n, chunks, 16
    if not residual:
        # Two-read kernel: one row per program from 4096 columns on, a warp per 512 elements
        # (H200: 8 warps at 4096 and 16 at 8192 were fastest of 4/8/16).
        block_m = max(1, min(4096 // block_n, 64))
        return block_m, block_n, chunks, min(max(block_m * block_n // 512, 4), 16)
    # Fused residual (H200 sweeps, bench_norm.py --sweep, bf16): 16K elements per program (4 rows
    # of 4096, 2 of 8192) with 8 warps were within 1% of the best config at both sizes; 4 rows of
    # 8192 with 4 warps ran 20% slower. Narrower rows are packed the same way.
    block_m = max(1, min(16384 // block_n, 64))
    return block_m, block_n, chunks, min(max(block_m * block_n // 2048, 4), 16)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_norm_inputs(op: str, x, weight, residual=None, dtypes=FLOAT_DTYPES):
    check_tensor(op, "x", x, dtypes=dtypes)
    check_tensor(op, "weight", weight, dtypes=dtypes)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"aiter_dist.{op}: weight must have shape ({x.shape[-1]},) to match the "
                         f"last dimension of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    check_same_device(op, x=x, weight=weight, residual=residual)
    check_last_dim_contiguous(op, "x", x)
    check_last_dim_contiguous(op, "weight", weight)
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=dtypes)
        if residual.shape != x.shape:
            raise ValueError(f"aiter_dist.{op}: residual shape {tuple(residual.shape)} differs "
                             f"from x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"aiter_dist.{op}: residual dtype {residual.dtype} differs from x "
                            f"dtype {x.dtype}; cast one of them")
        check_last_dim_contiguous(op, "residual", residual)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, N) view; copies only when the leading dims cannot be flattened. (The row
    count is spelled out: ``-1`` is ambiguous when N is 0.)"""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# float64 is accepted and computed by PyTorch ops in float64 (tests compare against float64).
NORM_DTYPES = FLOAT_DTYPES + (torch.float64,)


_KERNEL_DTYPES = frozenset(FLOAT_DTYPES)


def _plain_inputs(x, weight, residual) -> bool:
    """The common case in a few attribute reads: kernel dtypes, matching shapes and device,
    unit last-dim strides, something to compute. Anything else takes the full checks, which
    name the problem, and the PyTorch path where one serves."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES and weight.dim() == 1
            and x.dim() != 0 and weight.shape[0] == x.shape[-1] and x.device == weight.device
            and x.stride(-1) == 1 and weight.stride(-1) == 1 and x.numel() != 0
            and (residual is None
                 or (isinstance(residual, torch.Tensor) and residual.shape == x.shape
                     and residual.dtype == x.dtype and residual.device == x.device
                     and residual.stride(-1) == 1)))


def _needs_64bit_offsets(rows: int, n: int, *row_strides: int) -> bool:
    """Whether element offsets up to ``rows`` rows of ``n`` (strided by any of ``row_strides``, or
    ``n`` for the contiguous outputs) reach 2**31."""
    return rows * max(n, *row_strides) + n >= 2**31


_fwd_configs: dict = {}  # (N, residual) -> a GPU forward config (it does not depend on M)
_PATH = "triton-interpreter" if INTERPRETED else "triton"
# (x, weight signatures, need_rstd, residual's, current device) -> LaunchPlan; extra = (M, ints,
# whether empty_like(x) has the output's strides).
_fwd_plans = plan_cache()



def rms_norm_fwd(x, weight, eps=1e-6, residual=None, *, config=None, need_rstd=True):
    """Forward launcher. Returns (y, residual_out or None, rstd); rstd is None when
    ``need_rstd`` is False (a call without autograd: the kernel skips writing it)."""
    key = None
    if config is None:
        try:
            key = (*signature(x), *signature(weight), need_rstd,
                   None if residual is None else signature(residual), plan_device(x.device))
        except (AttributeError, TypeError):  # not tensors: the checks below name the problem
            pass
        plan = _fwd_plans.get(key)
        if plan is not None and not (x.data_ptr() | weight.data_ptr() | (
                0 if residual is None else residual.data_ptr())) & 15:
            return _planned_fwd(plan, x, weight, eps, residual, need_rstd)
    op = "add_rms_norm" if residual is not None else "rms_norm"
    if not _plain_inputs(x, weight, residual):
        _check_norm_inputs(op, x, weight, residual, dtypes=NORM_DTYPES)
    x2 = x if x.dim() == 2 else _rows(x)
    M, N = x2.shape
    r2 = None if residual is None else residual if residual.dim() == 2 else _rows(residual)
    if takes_torch_path(op, (x2,), (weight,)):
        y, res_out, rstd = _rms_norm_fwd_torch(x2, weight, eps, r2)
        return y.view(x.shape), (res_out.view(x.shape) if res_out is not None else None), rstd
    y = torch.empty_like(x2, memory_format=torch.contiguous_format)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device) if need_rstd else None
    if residual is not None:
        res_out = torch.empty_like(y)
    else:
        r2 = res_out = y  # unused placeholders, never dereferenced (HAS_RESIDUAL=False)
    planned = config is None and key is not None
    if config is None:
        if x.device.type == "cpu":
            config = _fwd_config(M, N, x.device, residual=residual is not None)
        else:
            ckey = (N, residual is not None)
            config = _fwd_configs.get(ckey)
            if config is None:
                config = _fwd_configs[ckey] = _fwd_config(M, N, x.device,
                                                          residual=residual is not None)
    block_m, block_n, chunks, num_warps = config
    stride_x, stride_r = x2.stride(0), r2.stride(0)
    ints = (M, N, stride_x, stride_r, N, N)
    plan = (plan_launch if planned else launch)(
        _rms_norm_fwd_kernel, (cdiv(M, block_m),), x.device,
        x2, r2, weight, y, res_out, y if rstd is None else rstd, *ints, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_CHUNKS=chunks, EVEN=(chunks == 1 and block_n == N and M % block_m == 0),
        OFFSETS_64=_needs_64bit_offsets(M + block_m, N, stride_x, stride_r),
        STORE_RSTD=need_rstd, num_warps=num_warps)
    # A plan launches with x and residual as given: only where the 2-D views are x's own memory
    # (a reshape that copied gives another pointer).
    if planned and plan is not None and x2.data_ptr() == x.data_ptr() and (
            residual is None or r2.data_ptr() == residual.data_ptr()):
        # (empty_like(x) where it gives the full path's strides: not for a size-1 dim strided)
        plan.extra = (M, ints, torch.empty_like(x).stride() == y.view(x.shape).stride())
        _fwd_plans[key] = plan
    record_path(op, _PATH)
    if x.dim() != 2:
        y = y.view(x.shape)
        if residual is not None:
            res_out = res_out.view(x.shape)
    return y, (res_out if residual is not None else None), rstd


def _planned_fwd(plan, x, weight, eps, residual, need_rstd):
    """rms_norm_fwd's launch from a plan: the outputs, one launch, the path record."""
    M, ints, like_x = plan.extra
    y = (torch.empty_like(x) if like_x
         else torch.empty(x.shape, dtype=x.dtype, device=x.device))
    rstd = torch.empty(M, dtype=torch.float32, device=x.device) if need_rstd else None
    if residual is None:
        plan(x, y, weight, y, y, y if rstd is None else rstd, *ints, eps)
        record_path("rms_norm", _PATH)
        return y, None, rstd
    res_out = torch.empty_like(y)
    plan(x, residual, weight, y, res_out, y if rstd is None else rstd, *ints, eps)
    record_path("add_rms_norm", _PATH)
    return y, res_out, rstd


def _bwd_config(M: int, N: int, device: torch.device, max_n: int):
    """(programs, BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps) for the backward."""
    block_n, chunks = _block_n(N, max_n)
    if device.type == "cpu":
        programs = 2
        block_m = max(1, min(next_pow2(cdiv(max(M, 1), programs)),
                             16384 // block_n))
        return programs, block_m, block_n, chunks, 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if chunks > 1:
        return sms * 4, 1, block_n, chunks, 16
    # H200 sweep (bench_norm.py --sweep): 16K elements per step, 8 warps up to 4096 columns and
    # 16 beyond, 8 programs per SM up to 4096 columns and 4 beyond. Fewer warps for the same block
    # spill registers (BLOCK_M=4 with 4 warps at 4096 columns ran 15x slower).
    narrow = block_n <= 4096
    return (sms * (8 if narrow else 4), max(1, min(16384 // block_n, 16)), block_n, chunks,
            8 if narrow else 16)


def rms_norm_bwd(dy, x_normed, weight, rstd, dresidual=None, *, max_n=ONE_PASS_MAX_N, config=None,
                 dw_fp32=False, need_dw=True):
    """Backward launcher: (dx, dweight). ``x_normed`` is the tensor that was normalized
    (``residual_out`` for the fused op); ``dresidual`` is the incoming grad of residual_out.
    ``dw_fp32``: return dweight unrounded, for a caller that still sums it over ranks.
    ``need_dw=False``: dweight is None, and neither computed nor summed."""
    key = None
    if config is None and max_n == ONE_PASS_MAX_N:
        try:
            key = (*signature(dy), *signature(x_normed), *signature(weight), rstd.dtype,
                   None if dresidual is None else signature(dresidual), dw_fp32, need_dw,
                   plan_device(x_normed.device))
        except (AttributeError, TypeError):
            pass
        plan = _bwd_plans.get(key)
        if plan is not None and not (dy.data_ptr() | x_normed.data_ptr() | weight.data_ptr()
                                     | rstd.data_ptr() | (0 if dresidual is None
                                                          else dresidual.data_ptr())) & 15:
            return _planned_bwd(plan, dy, x_normed, weight, rstd, dresidual)
    x2 = _rows(x_normed)
    M, N = x2.shape
    dy2 = _rows(dy.contiguous())
    dres2 = _rows(dresidual.contiguous()) if dresidual is not None else dy2
    if takes_torch_path("rms_norm_bwd", (x2,), (weight,)):
        dx, dw = _rms_norm_bwd_torch(dy2, x2, weight, rstd,
                                     dres2 if dresidual is not None else None)
        return dx.view(x_normed.shape), (None if not need_dw else dw.float() if dw_fp32
                                         else dw)
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    programs, block_m, block_n, chunks, num_warps = config or _bwd_config(M, N, x2.device, max_n)
    programs = max(1, min(programs, M))
    # (without dweight the kernel never touches its partials' pointer: dx stands in)
    dw_partial = (torch.empty(programs, N, dtype=torch.float32, device=x2.device) if need_dw
                  else dx)
    ints = (M, N, x2.stride(0), dy2.stride(0), dres2.stride(0), dx.stride(0), cdiv(M, programs))
    # A plan launches the inputs as given: only where their 2-D views are their own memory.
    planned = key is not None and x2.data_ptr() == x_normed.data_ptr() and (
        dy2.data_ptr() == dy.data_ptr()) and (dresidual is None
                                              or dres2.data_ptr() == dresidual.data_ptr())
    plan = (plan_launch if planned else launch)(
        _rms_norm_bwd_kernel, (programs,), x2.device,
        x2, weight, dy2, dres2, dx, dw_partial, rstd, *ints,
        HAS_DRES=dresidual is not None, BLOCK_M=block_m, BLOCK_N=block_n, NUM_CHUNKS=chunks,
        NEED_DW=need_dw, num_warps=num_warps)
    dw, dw_plan = (_dw_sum(dw_partial, torch.float32 if dw_fp32 else weight.dtype, planned)
                   if need_dw else (None, None))
    if planned and plan is not None and (dw_plan is not None or not need_dw):
        plan.extra = (programs, N, ints, dw_plan)
        _bwd_plans[key] = plan
    return dx.view(x_normed.shape), dw


# (dy, x_normed, weight signatures, rstd dtype, dresidual's, dw_fp32, need_dw, current device)
# -> LaunchPlan of the backward kernel; extra = (programs, N, ints, the dweight sum's plan or
# None without dweight).
_bwd_plans = plan_cache()


def _dw_sum(dw_partial, dtype, planned):
    """(dweight, its launch's plan or None): the programs' fp32 partial rows summed in a fixed
    order and rounded once to ``dtype``, in one launch."""
    programs, n = dw_partial.shape
    dw = torch.empty(n, dtype=dtype, device=dw_partial.device)
    if dw_partial.device.type == "cpu":  # the interpreter: few, wide programs
        block_p, block_n = next_pow2(programs), min(next_pow2(n), 1024)
    else:  # up to 64 partial rows a step, the columns split over ~256 programs, 4 warps
        # H200, to bf16 (bench_norm.py --dw-sum), against sum + cast: 1056 x 4096 partials 17.2
        # us vs 17.9 (64 programs of 32 rows ran 34.6), 528 x 8192 15.1 vs 27.4, 1056 x 1024
        # 14.4 vs 14.4, 8 x 1024 4.4 vs 8.1.
        block_p = min(64, next_pow2(programs))
        block_n = max(16, min(256, next_pow2(cdiv(n, 256))))
    plan = (plan_launch if planned else launch)(
        _dw_reduce_kernel, (cdiv(n, block_n),), dw.device, dw_partial, dw, programs, n,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    if not planned or plan is None:
        return dw, None
    plan.extra = dtype
    return dw, plan


def _planned_bwd(plan, dy, x_normed, weight, rstd, dresidual):
    """rms_norm_bwd's launches from plans: dx (contiguous), the partials, the backward, the
    dweight sum."""
    programs, n, ints, dw_plan = plan.extra
    dx = torch.empty(x_normed.shape, dtype=x_normed.dtype, device=x_normed.device)
    if dw_plan is None:
        plan(x_normed, weight, dy, dy if dresidual is None else dresidual, dx, dx, rstd, *ints)
        return dx, None
    dw_partial = torch.empty(programs, n, dtype=torch.float32, device=x_normed.device)
    plan(x_normed, weight, dy, dy if dresidual is None else dresidual, dx, dw_partial, rstd,
         *ints)
    dw = torch.empty(n, dtype=dw_plan.extra, device=x_normed.device)
    dw_plan(dw_partial, dw, programs, n)
    return dx, dw


def add_rms_norm_bwd(dy, dresidual_out, residual_out, weight, rstd, need_dw=True):
    """Gradients of (out, residual_out) = add_rms_norm(x, residual): (dx, dweight); x and
    residual receive the same dx. Either incoming gradient may be None."""
    if dy is None:
        dy = torch.zeros_like(residual_out)
    return rms_norm_bwd(dy, residual_out, weight, rstd, dresidual=dresidual_out, need_dw=need_dw)


# ----------------------------------------------------------------------------- autograd

class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, need_dw=ctx.needs_input_grad[1])
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, residual_out, rstd = rms_norm_fwd(x, weight, eps, residual=residual)
        ctx.save_for_backward(residual_out, weight, rstd)
        return y, residual_out

    @staticmethod
    def backward(ctx, dy, dresidual_out):
        residual_out, weight, rstd = ctx.saved_tensors
        dx, dw = add_rms_norm_bwd(dy, dresidual_out, residual_out, weight, rstd,
                                  need_dw=ctx.needs_input_grad[2])
        # d(x + residual)/dx = d/dresidual = 1: both inputs receive the same gradient.
        return dx, dx, dw, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, res_out, rstd = rms_norm_fwd(x, weight, eps, residual)
    return y, (res_out if res_out is not None else x.new_empty(0)), rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps):
    rows = math.prod(x.shape[:-1])
    # Contiguous, as the real outputs are, whatever x's strides.
    return (x.new_empty(x.shape), x.new_empty(x.shape) if residual is not None else x.new_empty(0),
            x.new_empty(rows, dtype=_acc_dtype(x, weight)))


@torch.library.custom_op("aiter_dist::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x_normed: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor, dresidual: torch.Tensor | None,
                     dw_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x_normed, weight, rstd, dresidual, dw_fp32=dw_fp32)


@_rms_norm_bwd_op.register_fake
def _(dy, x_normed, weight, rstd, dresidual, dw_fp32):
    return x_normed.new_empty(x_normed.shape), weight.new_empty(
        weight.shape, dtype=torch.float32 if dw_fp32 else weight.dtype)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, res_out, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(res_out if residual is not None else x, weight, rstd)


def _rms_norm_backward(ctx, dy, dres_out, drstd):
    x_normed, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.aiter_dist.rms_norm_bwd(dy, x_normed, weight, rstd,
                                               dres_out if ctx.has_residual else None, False)
    return dx, dw, (dx if ctx.has_residual else None), None


torch.library.register_autograd("aiter_dist::rms_norm_fwd", _rms_norm_backward,
                                setup_context=_rms_norm_setup)


def _needs_grad(*tensors) -> bool:
    # (getattr: a non-tensor goes on to the checks, which name it)
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ----------------------------------------------------------------------------- functional API

def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x**2, dim=-1) + eps) * weight``.

    Args:
        x: (..., N), float32, float16, bfloat16 or float64, contiguous in its last dimension
            (rows may be strided). Zero-size shapes are fine: (0, N) and (M, 0) give an empty
            output of the same shape.
        weight: (N,) on x's device, in any of those dtypes (an fp32 weight with fp16/bf16 ``x``
            is the usual mixed-precision layout).
        eps: added to the mean square before the square root.

    Returns:
        A new tensor of x's shape and dtype.

    Autograd: ``x`` receives a gradient in its dtype, ``weight`` in its own; dweight is summed
    over rows in fp32, in a fixed order.

    Numerics: statistics and the product in fp32, rounded once to x's dtype. On the kernel paths
    (``aiter_dist.last_path("rms_norm")`` is ``"triton"`` or ``"triton-interpreter"``) forward
    and backward are deterministic: the same inputs on the same device give the same bits every
    run. float64 inputs (computed in float64, on any device), zero-size inputs and CPU tensors
    on a GPU machine take a PyTorch path, recorded as ``"torch"``: the same formula, without
    that bitwise promise.
    """
    if compiling():
        return torch.ops.aiter_dist.rms_norm_fwd(x, weight, None, eps)[0]
    if _needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_fwd(x, weight, eps, need_rstd=False)[0]


def add_rms_norm(x, residual, weight, eps=1e-6):
    """Fused residual add and RMSNorm, one read of each input:

        residual_out = x + residual
        out = residual_out * rsqrt(mean(residual_out**2, dim=-1) + eps) * weight

    Args:
        x, residual: (..., N), one shape and one dtype (float32, float16, bfloat16 or float64;
            cast one of them if they differ), contiguous in the last dimension. Zero-size shapes
            give empty outputs.
        weight: (N,), as in :func:`rms_norm`.
        eps: as in :func:`rms_norm`.

    Returns:
        ``(out, residual_out)``, both of x's shape and dtype. The sum is rounded to x's dtype
        before it is normalized, so on the kernel paths ``out`` equals
        ``rms_norm(residual_out, weight, eps)`` bit for bit.

    Autograd: ``x`` and ``residual`` receive the same gradient (the incoming gradient of
    ``residual_out`` plus the norm's input gradient); either output may go unused. ``weight``
    as in :func:`rms_norm`.

    Numerics and paths: as :func:`rms_norm`, recorded under ``last_path("add_rms_norm")``.
    """
    if compiling():
        out, residual_out, _ = torch.ops.aiter_dist.rms_norm_fwd(x, weight, residual, eps)
        return out, residual_out
    if _needs_grad(x, residual, weight):
        return AddRMSNormFunction.apply(x, residual, weight, eps)
    out, residual_out, _ = rms_norm_fwd(x, weight, eps, residual, need_rstd=False)
    return out, residual_out


__all__ = ["rms_norm", "add_rms_norm", "rms_norm_ref", "add_rms_norm_ref", "rms_norm_fwd",
           "rms_norm_bwd", "add_rms_norm_bwd", "RMSNormFunction", "AddRMSNormFunction", "ONE_PASS_MAX_N"]
