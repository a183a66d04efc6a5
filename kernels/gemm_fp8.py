"""fp8 (e4m3) GEMMs with per-token or per-block scales, and the quantizers that make their inputs.

    gemm_a8w8(xq, wq, x_scale, w_scale, bias)   = (xq * x_scale) @ (wq * w_scale.T).T + bias
        xq (M, K), wq (N, K) fp8 e4m3; x_scale (M, 1) fp32 per token, w_scale (1, N) per channel
    gemm_a8w8_blockscale(xq, wq, x_scale, w_scale)  (DeepSeek-V3's recipe)
        x_scale (M, ceil(K/128)) per 1x128 block of xq, w_scale (ceil(N/128), ceil(K/128)) per
        128x128 block of wq

Both run on ``gemm.py``'s two kernels (pointer / Hopper persistent TMA): rowwise scales are
applied to the fp32 tile at the end, block scales to each 128-deep partial product (Hopper has no
block-scaled MMA). Where the tuned table measured ``torch._scaled_mm`` faster for a shape class,
``torch._scaled_mm`` serves instead (``aiter_dist.last_path`` says which).

Quantizers: ``scale = amax(|block|) / 448`` (448 = e4m3's largest finite value), ``q = x / scale``
rounded to e4m3, so ``q * scale`` reproduces ``x`` within half an e4m3 step.
"""
from __future__ import annotations

import torch

from ._runtime import (FLOAT_DTYPES, cdiv, check_same_device, check_tensor, compiling,
                       record_path, runs_triton)
from .gemm import BACKENDS, BLOCKWISE, ROWWISE, SCALE_BLOCK, _tuned, run_gemm, shape_class

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-12  # scale of an all-zero block (any positive value dequantizes it to 0)


# ----------------------------------------------------------------------------- reference

def quantize_per_block_fp8(x: torch.Tensor, block_shape=(1, SCALE_BLOCK)):
    """Quantize a 2-D tensor to fp8 e4m3 with one fp32 scale per ``block_shape`` block
    (edge blocks are partial). Returns ``(q, scale)``, scale of shape (ceil(R/br), ceil(C/bc)).
    ``(1, 128)`` is DeepSeek's activation blocking, ``(128, 128)`` its weight blocking.

    Scales of one-row blocks come row-index-major (stride (1, R)), others row-major: the layouts
    cuBLASLt's blockwise fp8 reads, and the one in which a GEMM tile's scales for one K block
    are adjacent (the GEMMs accept any strides)."""
    check_tensor("quantize_per_block_fp8", "x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    if x.dim() != 2:
        raise ValueError(f"aiter_dist.quantize_per_block_fp8: x must be 2-D, got shape "
                         f"{tuple(x.shape)}; reshape it to (rows, features) first")
    rows, cols = x.shape
    br, bc = block_shape
    nr, nc = cdiv(rows, br), cdiv(cols, bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=x.device)
    padded[:rows, :cols] = x
    blocks = padded.view(nr, br, nc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if br == 1:
        scale = scale.t().contiguous().t()
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale


def quantize_per_token_fp8(x: torch.Tensor):
    """Quantize (tokens, features) to fp8 e4m3 with one fp32 scale per row: ``(q, scale)``,
    scale (M, 1). For gemm_a8w8's ``w_scale`` (1, N), quantize the weight the same way and
    pass ``scale.T``."""
    return quantize_per_block_fp8(x, (1, max(x.shape[-1], 1)))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_shape, dtype=torch.float64):
    """``q * scale`` with each scale spread over its ``block_shape`` block, in ``dtype``."""
    br, bc = block_shape
    full = scale.to(dtype).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return q.to(dtype) * full[:q.shape[0], :q.shape[1]]


def gemm_a8w8_ref(xq, wq, x_scale, w_scale, bias=None, dtype=torch.bfloat16):
    """Dequantize, multiply and add in fp32 (fp64 when ``dtype`` is fp64), return ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = (xq.to(acc) * x_scale.to(acc)) @ (wq.to(acc) * w_scale.to(acc).t()).t()
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(dtype)


def gemm_a8w8_blockscale_ref(xq, wq, x_scale, w_scale, dtype=torch.bfloat16):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = dequantize_fp8(xq, x_scale, (1, SCALE_BLOCK), acc)
    w = dequantize_fp8(wq, w_scale, (SCALE_BLOCK, SCALE_BLOCK), acc)
    return (x @ w.t()).to(dtype)


# ----------------------------------------------------------------------------- launchers

def _check_fp8_inputs(op, xq, wq, x_scale, w_scale, bias, dtype, scale_shapes):
    hint = "quantize_per_block_fp8" if op.endswith("blockscale") else "quantize_per_token_fp8"
    for name, t in (("xq", xq), ("wq", wq)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"aiter_dist.{op}: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dtype != FP8:
            raise TypeError(f"aiter_dist.{op}: {name} has dtype {t.dtype}, expected "
                            f"torch.float8_e4m3fn; quantize it first with aiter_dist.{hint}")
        if t.dim() != 2:
            raise ValueError(f"aiter_dist.{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if xq.shape[1] != wq.shape[1]:
        raise ValueError(f"aiter_dist.{op}: xq's K {xq.shape[1]} must equal wq's K {wq.shape[1]} "
                         f"(xq is (M, K), wq is (N, K); computing xq @ wq.T)")
    for name, t, shape in (("x_scale", x_scale, scale_shapes[0]),
                           ("w_scale", w_scale, scale_shapes[1])):
        check_tensor(op, name, t, dtypes=(torch.float32,))
        if tuple(t.shape) != shape:
            raise ValueError(f"aiter_dist.{op}: {name} must have shape {shape} for xq "
                             f"{tuple(xq.shape)} and wq {tuple(wq.shape)}, got "
                             f"{tuple(t.shape)}; make it with aiter_dist.{hint}")
    if bias is not None:
        check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (wq.shape[0],):
            raise ValueError(f"aiter_dist.{op}: bias must have shape ({wq.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"aiter_dist.{op}: dtype must be one of float32, float16, bfloat16, "
                        f"got {dtype}")
    check_same_device(op, xq=xq, wq=wq, x_scale=x_scale, w_scale=w_scale, bias=bias)


def scaled_mm_rowwise(xq, wq, x_scale, w_scale, bias=None, dtype=torch.bfloat16):
    """The vendor path: ``torch._scaled_mm`` (cuBLASLt / CUTLASS) with rowwise scales."""
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale.contiguous(),
                            scale_b=w_scale.contiguous(),
                            bias=bias.to(dtype) if bias is not None else None, out_dtype=dtype)


def scaled_mm_blockwise(xq, wq, x_scale, w_scale, dtype=torch.bfloat16):
    """The vendor path: ``torch._scaled_mm`` with 1x128 / 128x128 block scales (cuBLASLt on
    sm_90, CUDA 12.9+). cuBLASLt reads the scales outer-dimension-major: x_scale (M, K/128) with
    stride (1, M), w_scale as (K/128, N/128) with stride (1, K/128) (no copies when the scales
    come from ``quantize_per_block_fp8``)."""
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale.t().contiguous().t(),
                            scale_b=w_scale.contiguous().t(), out_dtype=dtype)


def _vendor_fits(kind, M, N, K) -> bool:
    """Shapes ``torch._scaled_mm`` takes: K and N multiples of 16; blockwise, K a multiple of 512
    (scales padded to 4 K blocks) and N of 128."""
    if K % 16 or N % 16:
        return False
    return kind == "fp8" or (K % (4 * SCALE_BLOCK) == 0 and N % SCALE_BLOCK == 0)


def _use_vendor(op, kind, xq, wq, backend) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"aiter_dist.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    M, K = xq.shape
    N = wq.shape[0]
    if xq.device.type != "cuda" or not _vendor_fits(kind, M, N, K):
        return False
    if backend == "vendor":
        return True
    return backend == "auto" and _tuned(shape_class("nt", kind, M, N, K)).get("winner") == "vendor"


def gemm_a8w8_fwd(xq, wq, x_scale, w_scale, bias=None, dtype=torch.bfloat16, *, config=None,
                  tma=None, backend="auto"):
    """Launcher of gemm_a8w8: checks, then our kernel or torch._scaled_mm (see the module doc)."""
    op = "gemm_a8w8"
    M, N = xq.shape[0], wq.shape[0]
    _check_fp8_inputs(op, xq, wq, x_scale, w_scale, bias, dtype, ((M, 1), (1, N)))
    if _use_vendor(op, "fp8", xq, wq, backend):
        record_path(op, "torch._scaled_mm")
        return scaled_mm_rowwise(xq, wq, x_scale, w_scale, bias, dtype)
    if not runs_triton(op, xq.device):
        return gemm_a8w8_ref(xq, wq, x_scale, w_scale, bias, dtype)
    out = torch.empty(M, N, dtype=dtype, device=xq.device)
    return run_gemm(op, "fp8", xq, wq.t(), out, bias, x_scale, w_scale, ROWWISE, config, tma)


def gemm_a8w8_blockscale_fwd(xq, wq, x_scale, w_scale, dtype=torch.bfloat16, *, config=None,
                             tma=None, backend="auto"):
    """Launcher of gemm_a8w8_blockscale: checks, then our kernel or torch._scaled_mm."""
    op = "gemm_a8w8_blockscale"
    (M, K), N = xq.shape, wq.shape[0]
    kb, nb = cdiv(K, SCALE_BLOCK), cdiv(N, SCALE_BLOCK)
    _check_fp8_inputs(op, xq, wq, x_scale, w_scale, None, dtype, ((M, kb), (nb, kb)))
    if _use_vendor(op, "fp8-block", xq, wq, backend):
        record_path(op, "torch._scaled_mm")
        return scaled_mm_blockwise(xq, wq, x_scale, w_scale, dtype)
    if not runs_triton(op, xq.device):
        return gemm_a8w8_blockscale_ref(xq, wq, x_scale, w_scale, dtype)
    out = torch.empty(M, N, dtype=dtype, device=xq.device)
    return run_gemm(op, "fp8-block", xq, wq.t(), out, None, x_scale, w_scale, BLOCKWISE, config,
                    tma)


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::gemm_a8w8", mutates_args=())
def _gemm_a8w8_op(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor,
                  w_scale: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    return gemm_a8w8_fwd(xq, wq, x_scale, w_scale, bias, dtype)


@_gemm_a8w8_op.register_fake
def _(xq, wq, x_scale, w_scale, bias, dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=dtype)


@torch.library.custom_op("aiter_dist::gemm_a8w8_blockscale", mutates_args=())
def _gemm_a8w8_blockscale_op(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor,
                             w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gemm_a8w8_blockscale_fwd(xq, wq, x_scale, w_scale, dtype)


@_gemm_a8w8_blockscale_op.register_fake
def _(xq, wq, x_scale, w_scale, dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=dtype)


# ----------------------------------------------------------------------------- functional API

def gemm_a8w8(xq, wq, x_scale, w_scale, bias=None, dtype=torch.bfloat16):
    """fp8 GEMM with per-token / per-channel scales: ``(xq * x_scale) @ (wq * w_scale.T).T + bias``.

    xq: (M, K) float8_e4m3fn; wq: (N, K) float8_e4m3fn; x_scale: (M, 1) fp32; w_scale: (1, N)
    fp32; bias: (N,) or None; returns (M, N) in ``dtype``. No autograd (inference / forward).
    """
    if compiling():
        return torch.ops.aiter_dist.gemm_a8w8(xq, wq, x_scale, w_scale, bias, dtype)
    return gemm_a8w8_fwd(xq, wq, x_scale, w_scale, bias, dtype)


def gemm_a8w8_blockscale(xq, wq, x_scale, w_scale, dtype=torch.bfloat16):
    """fp8 GEMM with DeepSeek-style block scales: ``x_scale`` (M, ceil(K/128)) per 1x128 block of
    xq (M, K), ``w_scale`` (ceil(N/128), ceil(K/128)) per 128x128 block of wq (N, K); returns
    (M, N) in ``dtype``. Make the inputs with ``quantize_per_block_fp8(x, (1, 128))`` and
    ``quantize_per_block_fp8(w, (128, 128))``."""
    if compiling():
        return torch.ops.aiter_dist.gemm_a8w8_blockscale(xq, wq, x_scale, w_scale, dtype)
    return gemm_a8w8_blockscale_fwd(xq, wq, x_scale, w_scale, dtype)


__all__ = ["gemm_a8w8", "gemm_a8w8_blockscale", "gemm_a8w8_fwd", "gemm_a8w8_blockscale_fwd",
           "gemm_a8w8_ref", "gemm_a8w8_blockscale_ref", "quantize_per_token_fp8",
           "quantize_per_block_fp8", "dequantize_fp8", "scaled_mm_rowwise", "scaled_mm_blockwise",
           "FP8_MAX"]
