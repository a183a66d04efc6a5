"""SwiGLU's activation, forward and backward:  y = silu(gate) * up = gate * sigmoid(gate) * up.

    backward, s = sigmoid(gate):  dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s

An elementwise kernel over a (rows, N) tile grid: contiguous inputs are one flat row (every
load a full vector, no row arithmetic); inputs that are row-strided views (gate and up as the
two halves of one fused projection, ``gu.chunk(2, -1)``) are read in place through their row
strides. Other layouts are copied to contiguous first, recorded as a ``-copied`` path. The
backward reads dy, gate and up once and writes dgate and dup in the same pass; only the inputs
are saved for it (silu(gate) is recomputed, not stored). Math in fp32, one rounding to the
inputs' dtype; outputs and gradients are contiguous.

float64 (computed in float64), zero-size inputs and CPU tensors on a GPU machine take a PyTorch
path with the same contract, recorded as ``last_path("swiglu") == "torch"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import (FLOAT_DTYPES, INTERPRETED, cdiv, check_same_device, check_tensor,
                       compiling, launch, next_pow2, plan_cache, plan_device, plan_launch,
                       record_path, takes_torch_path)

SWIGLU_DTYPES = FLOAT_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------- reference

def swiglu_ref(gate, up):
    """Plain PyTorch ``silu(gate) * up`` in fp32 (float64 where an input is float64), rounded to
    gate's dtype; differentiable."""
    acc = torch.float64 if torch.float64 in (gate.dtype, up.dtype) else torch.float32
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def _swiglu_bwd_torch(dy, gate, up):
    acc = torch.float64 if torch.float64 in (gate.dtype, up.dtype) else torch.float32
    g, u, d = gate.to(acc), up.to(acc), dy.to(acc)
    s = torch.sigmoid(g)
    dgate = d * u * s * (1 + g * (1 - s))
    return (dgate.to(gate.dtype).contiguous(), (d * g * s).to(up.dtype).contiguous())


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile_offsets(pid, n_col_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  OFFSETS_64: tl.constexpr):
    """(rows, cols) of program ``pid``'s tile: programs walk the column blocks of a row block."""
    pid_m = pid // n_col_blocks
    pid_n = pid - pid_m * n_col_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFFSETS_64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return rows, cols


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,                           # gate, up (row-strided), y (contiguous rows of N)
    M, N,                              # rows and columns (a flat contiguous input: M = 1)
    n_col_blocks,                      # cdiv(N, BLOCK_N)
    stride_g, stride_u, stride_y,      # row strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    # EVEN: the tiles cover (M, N) exactly, so no masks (full-width vector accesses).
    rows, cols = _tile_offsets(tl.program_id(0), n_col_blocks, BLOCK_M, BLOCK_N,
                               OFFSETS_64)
    r = rows[:, None]
    c = cols[None, :]
    mask = (r < M) & (c < N)
    if EVEN:
        g = tl.load(G + r * stride_g + c).to(tl.float32)
        u = tl.load(U + r * stride_u + c).to(tl.float32)
    else:
        g = tl.load(G + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    y = (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty)
    if EVEN:
        tl.store(Y + r * stride_y + c, y)
    else:
        tl.store(Y + r * stride_y + c, y, mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,                  # dy, gate, up (row-strided); dgate, dup (contiguous)
    M, N, n_col_blocks,
    stride_dy, stride_g, stride_u, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    rows, cols = _tile_offsets(tl.program_id(0), n_col_blocks, BLOCK_M, BLOCK_N,
                               OFFSETS_64)
    r = rows[:, None]
    c = cols[None, :]
    mask = (r < M) & (c < N)
    if EVEN:
        dy = tl.load(DY + r * stride_dy + c).to(tl.float32)
        g = tl.load(G + r * stride_g + c).to(tl.float32)
        u = tl.load(U + r * stride_u + c).to(tl.float32)
    else:
        dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    if EVEN:
        tl.store(DG + r * stride_out + c, dg.to(DG.dtype.element_ty))
        tl.store(DU + r * stride_out + c, du.to(DU.dtype.element_ty))
    else:
        tl.store(DG + r * stride_out + c, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + r * stride_out + c, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Elements per program and warps, flat (contiguous) or row-strided; a row tile is at most
# GPU_MAX_BLOCK_N wide. H200, 8192 x 11008 bf16: 2048 elements with 8 warps were within 1% of the
# best of 2048..8192 x 4/8 warps in both layouts, forward and backward (99% of copy bandwidth).
# Retune here.
GPU_TILE_ELEMENTS = 2048
GPU_MAX_BLOCK_N = 2048
GPU_NUM_WARPS = 8


def swiglu_config(M: int, N: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a (M, N) problem; M == 1 is the flat layout."""
    if device.type == "cpu":
        # The interpreter pays per program and per op, not per element: few, large programs.
        block_n = min(next_pow2(N), 16384)
        return max(1, min(next_pow2(M), 16384 // block_n)), block_n, 1
    if M == 1:
        return 1, min(GPU_TILE_ELEMENTS, next_pow2(N)), GPU_NUM_WARPS
    block_n = min(next_pow2(N), GPU_MAX_BLOCK_N)
    return max(1, GPU_TILE_ELEMENTS // block_n), block_n, GPU_NUM_WARPS


_PATH = "triton-interpreter" if INTERPRETED else "triton"


def _row_view(t: torch.Tensor, rows: int, n: int):
    """t as a (rows, n) view with unit column stride, or None when its strides cannot say so."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    if t.dim() == 1:
        return t.view(1, n)
    try:
        return t.view(rows, n)
    except RuntimeError:
        return None


def _layout(op: str, *tensors):
    """(M, N, views): one flat row when every tensor is contiguous (the views are the tensors
    themselves), else (rows, last dim) row views, copying a tensor that has none (recorded)."""
    if all(t.is_contiguous() for t in tensors):
        n = tensors[0].numel()
        return 1, n, tensors
    n = tensors[0].shape[-1]
    m = tensors[0].numel() // n
    views = []
    for t in tensors:
        v = _row_view(t, m, n)
        if v is None:
            record_path(op + "_layout", "copied", "an input with strides a row view cannot "
                        "express (last dim not contiguous, or rows not evenly strided): copied "
                        "to contiguous first")
            v = t.contiguous().view(m, n)
        views.append(v)
    return m, n, views


def _needs_64bit(m: int, n: int, *row_strides: int) -> bool:
    return m * max(n, *row_strides) + n >= 2**31


_plans = plan_cache()  # a call's signature -> (grid, int args, constexprs, num_warps, LaunchPlan)


def _launch(kernel, tensors, m, n, row_strides, device, config):
    """Launch ``kernel`` over a (m, n) problem: ``tensors`` are its pointer arguments, then the
    row strides of the inputs and of the (contiguous) outputs. Grid, ints and constexprs are
    computed once per signature; a call adds its pointers (and their 16-byte alignment, which
    completes what Triton specializes on)."""
    key = (kernel, m, n, row_strides, tensors[0].dtype, device, config, plan_device(device))
    plan = _plans.get(key)
    if plan is None:
        block_m, block_n, num_warps = config or swiglu_config(m, n, device)
        col_blocks = cdiv(n, block_n)
        plan = ((cdiv(m, block_m) * col_blocks,), (m, n, col_blocks, *row_strides, n),
                dict(BLOCK_M=block_m, BLOCK_N=block_n,
                     EVEN=(m % block_m == 0 and n % block_n == 0),
                     OFFSETS_64=_needs_64bit(m + block_m, n + block_n, *row_strides)), num_warps,
                None)
        _plans[key] = plan
    grid, ints, constexprs, num_warps, launch_plan = plan
    align = 0
    for t in tensors:
        align |= t.data_ptr()
    if align & 15 == 0:  # the common case: a LaunchPlan (made by the first aligned call)
        if launch_plan is not None:
            launch_plan(*tensors, *ints)
        else:
            _plans[key] = (grid, ints, constexprs, num_warps, plan_launch(
                kernel, grid, device, *tensors, *ints, num_warps=num_warps, **constexprs))
        return
    launch(kernel, grid, device, *tensors, *ints,
           launch_key=(key, tuple(t.data_ptr() & 15 for t in tensors)), num_warps=num_warps,
           **constexprs)


def swiglu_fwd(gate, up, *, config=None):
    """Forward launcher (inputs checked by the caller): silu(gate) * up, contiguous."""
    op = "swiglu"
    if takes_torch_path(op, (gate, up)):
        return swiglu_ref(gate, up).contiguous()
    m, n, (g2, u2) = _layout(op, gate, up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    # Flat: M = 1 and the row strides are never used; pass n.
    strides = (n, n) if m == 1 else (g2.stride(0), u2.stride(0))
    _launch(_swiglu_fwd_kernel, (g2, u2, y), m, n, strides, gate.device, config)
    record_path(op, _PATH)
    return y


def swiglu_bwd(dy, gate, up, *, config=None):
    """Backward launcher: (dgate, dup), contiguous, from the incoming gradient and the inputs."""
    op = "swiglu_bwd"
    if takes_torch_path(op, (gate, up)):
        return _swiglu_bwd_torch(dy, gate, up)
    m, n, (d2, g2, u2) = _layout(op, dy, gate, up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    strides = (n, n, n) if m == 1 else (d2.stride(0), g2.stride(0), u2.stride(0))
    _launch(_swiglu_bwd_kernel, (d2, g2, u2, dgate, dup), m, n, strides, gate.device, config)
    record_path(op, _PATH)
    return dgate, dup


# ----------------------------------------------------------------------------- autograd

class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)  # the inputs only: silu(gate) is recomputed
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)  # contiguous, as the real output is


@torch.library.custom_op("aiter_dist::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return torch.ops.aiter_dist.swiglu_bwd(dy, gate, up)


torch.library.register_autograd("aiter_dist::swiglu_fwd", _swiglu_backward,
                                setup_context=_swiglu_setup)


# ----------------------------------------------------------------------------- functional API

_KERNEL_DTYPES = frozenset(FLOAT_DTYPES)


def _check_swiglu(op, gate, up):
    check_tensor(op, "gate", gate, dtypes=SWIGLU_DTYPES, ndim_min=0)
    check_tensor(op, "up", up, dtypes=SWIGLU_DTYPES, ndim_min=0)
    if gate.shape != up.shape:
        raise ValueError(f"aiter_dist.{op}: gate shape {tuple(gate.shape)} differs from up shape "
                         f"{tuple(up.shape)}; split the fused projection into equal halves")
    if gate.dtype != up.dtype:
        raise TypeError(f"aiter_dist.{op}: gate dtype {gate.dtype} differs from up dtype "
                        f"{up.dtype}; cast one of them")
    check_same_device(op, gate=gate, up=up)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def swiglu(gate, up):
    """SwiGLU's activation ``silu(gate) * up`` in one pass.

    Args:
        gate, up: one shape (any, 0-d included) and one dtype (float32, float16, bfloat16 or
            float64), on one device. Contiguous tensors, and row-strided views such as the two
            halves of a fused gate/up projection (``gu.chunk(2, dim=-1)``), are read in place;
            other layouts are copied first (``last_path("swiglu_layout") == "copied"``).

    Returns:
        A new contiguous tensor of gate's shape and dtype.

    Autograd: ``dgate = dy * up * s * (1 + gate * (1 - s))`` and ``dup = dy * gate * s`` with
    ``s = sigmoid(gate)``, both from one kernel that reads dy, gate and up once; only gate and
    up are kept for the backward.

    Numerics: fp32 math, one rounding to the inputs' dtype. float64 inputs are computed by
    PyTorch in float64 (``last_path("swiglu") == "torch"``), as are zero-size inputs and CPU
    tensors on a GPU machine; otherwise ``"triton"`` (``"triton-interpreter"`` without a GPU).
    """
    if not (type(gate) is torch.Tensor and type(up) is torch.Tensor and gate.shape == up.shape
            and gate.dtype == up.dtype and gate.dtype in _KERNEL_DTYPES
            and gate.device == up.device):
        _check_swiglu("swiglu", gate, up)  # names the problem, or admits float64 / subclasses
    if compiling():
        return torch.ops.aiter_dist.swiglu_fwd(gate, up)
    if _needs_grad(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_fwd(gate, up)


__all__ = ["swiglu", "swiglu_ref", "swiglu_fwd", "swiglu_bwd", "swiglu_config", "SwiGLUFunction"]
