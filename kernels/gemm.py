"""GEMM: ``linear`` (forward, dgrad, wgrad) and the matrix product every other GEMM here runs on.

    matmul(a, b, bias)   = a @ b + bias           a (M, K), b (K, N), any strides
    linear(x, w, bias)   = x @ w.T + bias         F.linear semantics, autograd
    dgrad                = dy @ w                 (w used as it is stored: N-major b)
    wgrad                = dy.T @ x               (a reduction over tokens: M-major a)

One kernel serves the three passes: operands are read through their strides, never copied. fp8
(``gemm_fp8.py``) runs on the same two kernels with per-token or per-block scales. Two paths:

* ``_gemm_kernel``: plain pointers, any strides, one program per output tile. It serves the
  interpreter, AMD, pre-Hopper GPUs and every layout TMA refuses.
* ``_gemm_tma_kernel``: Hopper (capability 9.x). Persistent (one program per SM walks the tiles
  in grouped order), operands and output through tensor descriptors (TMA), chosen when every
  operand has a unit-stride dimension and 16-byte aligned base and strides. The descriptors are
  made on the host (``triton.tools.tensor_descriptor``): no ``triton.set_allocator``, which is
  per thread and would be missing on autograd's backward thread; the same code runs on Triton
  3.6 and 3.9.

Both accumulate in fp32. fp32 inputs multiply in TF32 only where
``torch.backends.cuda.matmul.allow_tf32`` allows it, else in full fp32. In the interpreter every
tile is upcast to fp32 right after its load (bf16 arithmetic is wrong there).

Dispatch (``linear_backends``): per pass, a shape class ``"<layout> <dtype> <M>x<N>x<K>"``
(layout: a then b, ``n`` when K is the contiguous dimension of a / not of b: forward ``nt``,
dgrad ``nn``, wgrad ``tn``; sizes rounded up to powers of 2) is looked up in ``gemm_tuned.TUNED``,
measured on the GPU by ``benchmarks/bench_gemm.py --sweep``. It gives our config for the class and
whether ours or the vendor GEMM (cuBLAS/hipBLASLt) won there. ``linear`` runs ours unless the
vendor won; ``tgemm.mm`` runs the vendor's unless ours won.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import (INTERPRETED, cdiv, check_same_device, check_tensor, compiling,
                       ensure_scratch_allocator, last_path, launch, next_pow2, plan_cache,
                       plan_device, plan_launch, record_path, runs_triton, signature)
from .gemm_tuned import TUNED

# Eager launches of the TMA kernel build its descriptors on the GPU from plain pointers
# (``tl.make_tensor_descriptor``) rather than have the host encode three on every launch; CUDA-graph
# captures keep host descriptors. Env ``AITER_DIST_DEVICE_TMA=0``: host descriptors always.
DEVICE_TMA = os.environ.get("AITER_DIST_DEVICE_TMA", "1") == "1"

_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)

# SCALING modes of the kernels: plain, per-token x per-channel fp8, 1x128 x 128x128 fp8 blocks.
NO_SCALES, ROWWISE, BLOCKWISE = 0, 1, 2
SCALE_BLOCK = 128
BACKENDS = ("auto", "triton", "vendor")


# ----------------------------------------------------------------------------- reference

def gemm_ref(a, b, bias=None, out_dtype=None):
    """``a @ b + bias`` accumulated in fp32 (fp64 for fp64 inputs), returned in ``out_dtype``
    (default: a's dtype)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = a.to(acc) @ b.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(out_dtype or a.dtype)


def linear_ref(x, weight, bias=None):
    """``F.linear`` with fp32 (fp64) accumulation: ``x @ weight.T + bias``, any leading dims."""
    out = gemm_ref(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight.t(), bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Output tile ``tile_id`` in grouped order: GROUP_M row tiles walk the columns together, so
    their rows of a stay in L2 while b streams past.

    The one place tile order is decided. A distributed GEMM that gathers a's rows chunk by chunk
    rotates ``pid_m`` here (its own rows first) and waits on the chunk's ready flag before the
    tile's first load of a; the M-tile index is all it needs."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    in_group = tile_id % tiles_per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _block_scales(X_SCALE, W_SCALE, off_m, off_n, kb, M, N, sxm, sxk, swn, swk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """K block ``kb``'s scales for the tile at (off_m, off_n): one per row of a (1x128 blocks)
    and one per 128 columns of b (128x128 blocks). When the tile's columns lie in one 128-block
    the two fold into one scale per row (one multiply-add per element in the loop, not three)."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    xs = tl.load(X_SCALE + offs_m * sxm + kb * sxk, mask=offs_m < M, other=0.0)
    if 128 % BLOCK_N == 0:
        xs = xs * tl.load(W_SCALE + (off_n // 128) * swn + kb * swk)
        ws = tl.full((BLOCK_N,), 1.0, tl.float32)  # (folded into xs)
    else:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        ws = tl.load(W_SCALE + (offs_n // 128) * swn + kb * swk, mask=offs_n < N, other=0.0)
    return xs, ws


@triton.jit
def _mma(acc, a, b, xs, ws, SCALING: tl.constexpr, PRECISION: tl.constexpr,
         UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a @ b, in fp32. Blockwise fp8 scales each 128-deep partial product before adding
    it (Hopper has no block-scaled MMA; the tensor cores' partial sums reach fp32 there too);
    rowwise fp8 folds its scales in at the end but still promotes the partial sums to fp32
    every BLOCK_K (the fp8 MMA accumulator keeps fewer bits)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if SCALING == 2:
        part = tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)
        if 128 % BLOCK_N == 0:
            acc += part * xs[:, None]
        else:
            acc += part * xs[:, None] * ws[None, :]
    elif SCALING == 1:
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32,
                     max_num_imprecise_acc=BLOCK_K)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, BIAS, X_SCALE, W_SCALE, sxm, swn,
              HAS_BIAS: tl.constexpr, SCALING: tl.constexpr):
    """Rowwise fp8 scales and the bias, applied to the fp32 tile."""
    if SCALING == 1:
        xs = tl.load(X_SCALE + offs_m * sxm, mask=offs_m < M, other=0.0)
        ws = tl.load(W_SCALE + offs_n * swn, mask=offs_n < N, other=0.0)
        acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemm_kernel(
    A,                   # (M, K) operand, any strides
    B,                   # (K, N) operand, any strides
    C,                   # (M, N) output
    BIAS,                # (N,) bias, read when HAS_BIAS
    X_SCALE,             # fp32 scales of A's rows: (M, 1) rowwise, (M, ceil(K/128)) blockwise
    W_SCALE,             # fp32 scales of B's columns: (1, N) rowwise, (ceil(N/128), ceil(K/128))
    M, N, K,             # problem size
    sam, sak,            # A strides (row, reduction)
    sbk, sbn,            # B strides (reduction, column)
    scm, scn,            # C strides
    sxm, sxk,            # X_SCALE strides (row, K block)
    swn, swk,            # W_SCALE strides (N block or column, K block)
    HAS_BIAS: tl.constexpr,    # add BIAS
    SCALING: tl.constexpr,     # 0 none, 1 rowwise fp8, 2 blockwise fp8 (BLOCK_K == 128)
    PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands ("tf32" / "ieee")
    UPCAST: tl.constexpr,      # interpreter: tiles to fp32 right after the load
    EVEN_K: tl.constexpr,      # K % BLOCK_K == 0: no masks on the reduction
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,     # row tiles per group of the grouped order
):
    # One output tile per program. Rows and columns past the end wrap around (% M, % N) so the
    # loads need no masks; the store drops them.
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = A + rows[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = B + offs_k[:, None] * sbk + cols[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        xs = 0.0  # (unused unless blockwise)
        ws = 0.0
        if SCALING == 2:
            xs, ws = _block_scales(X_SCALE, W_SCALE, pid_m * BLOCK_M, pid_n * BLOCK_N, kb, M, N,
                                   sxm, sxk, swn, swk, BLOCK_M, BLOCK_N)
        acc = _mma(acc, a, b, xs, ws, SCALING, PRECISION, UPCAST, BLOCK_N, BLOCK_K)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    acc = _epilogue(acc, offs_m, offs_n, M, N, BIAS, X_SCALE, W_SCALE, sxm, swn, HAS_BIAS, SCALING)
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * scm + offs_n[None, :] * scn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemm_tma_kernel(
    A,                   # descriptor: (M, K), blocks [BLOCK_M, BLOCK_K] if A_K_MAJOR, else (K, M)
    B,                   # descriptor: (N, K), blocks [BLOCK_N, BLOCK_K] if B_K_MAJOR, else (K, N)
    C,                   # descriptor of the (M, N) output: blocks [BLOCK_M, BLOCK_N (/2: SUBTILE)]
    BIAS,                # (N,) bias, read when HAS_BIAS
    X_SCALE,             # fp32 scales of A's rows: (M, 1) rowwise, (M, ceil(K/128)) blockwise
    W_SCALE,             # fp32 scales of B's columns: (1, N) rowwise, (ceil(N/128), ceil(K/128))
    M, N, K,             # problem size
    sxm, sxk,            # X_SCALE strides (row, K block)
    swn, swk,            # W_SCALE strides (N block or column, K block)
    sa, sb, sc,          # DEVICE_DESC: the row strides of A, B, C as the descriptors see them
    A_K_MAJOR: tl.constexpr,   # A's reduction dim is contiguous (forward, dgrad), else wgrad's dy.T
    B_K_MAJOR: tl.constexpr,   # B's reduction dim is contiguous (nn.Linear weight), else dgrad's w
    HAS_BIAS: tl.constexpr,    # add BIAS
    SCALING: tl.constexpr,     # 0 none, 1 rowwise fp8, 2 blockwise fp8 (BLOCK_K == 128)
    PRECISION: tl.constexpr,   # tl.dot input_precision for fp32 operands ("tf32" / "ieee")
    UPCAST: tl.constexpr,      # interpreter: tiles to fp32 right after the load
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,     # row tiles per group of the grouped order
    NUM_SMS: tl.constexpr,     # programs launched (at most this many): the tile stride
    FLATTEN: tl.constexpr,     # let the compiler flatten the tile and K loops into one pipeline
    SUBTILE: tl.constexpr,     # store the output in two halves (less shared memory, more stages)
    DEVICE_DESC: tl.constexpr = False,   # A, B, C are pointers: build the descriptors here
):
    if DEVICE_DESC:
        # Descriptors built on the GPU (into the launch's global scratch): the host passes plain
        # pointers and encodes nothing per call (a host descriptor costs ~20 us of encoding).
        if A_K_MAJOR:
            A = tl.make_tensor_descriptor(A, [M, K], [sa, 1], [BLOCK_M, BLOCK_K])
        else:
            A = tl.make_tensor_descriptor(A, [K, M], [sa, 1], [BLOCK_K, BLOCK_M])
        if B_K_MAJOR:
            B = tl.make_tensor_descriptor(B, [N, K], [sb, 1], [BLOCK_N, BLOCK_K])
        else:
            B = tl.make_tensor_descriptor(B, [K, N], [sb, 1], [BLOCK_K, BLOCK_N])
        if SUBTILE:
            C = tl.make_tensor_descriptor(C, [M, N], [sc, 1], [BLOCK_M, BLOCK_N // 2])
        else:
            C = tl.make_tensor_descriptor(C, [M, N], [sc, 1], [BLOCK_M, BLOCK_N])
    # Persistent: program p takes tiles p, p + NUM_SMS, ... The copy engine zero-fills tiles
    # past the edges and clips the stores, so no masks. tile_id_c recomputes the epilogue's
    # tile apart from the loads' (lets the compiler flatten the loop nest, as Triton's
    # persistent-matmul tutorial does).
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_id_c = start - NUM_SMS
    for tile_id in tl.range(start, num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_tiles):
            off_k = kb * BLOCK_K
            if A_K_MAJOR:
                a = A.load([off_m, off_k])
            else:
                a = tl.trans(A.load([off_k, off_m]))
            if B_K_MAJOR:
                b = tl.trans(B.load([off_n, off_k]))
            else:
                b = B.load([off_k, off_n])
            xs = 0.0  # (unused unless blockwise)
            ws = 0.0
            if SCALING == 2:
                xs, ws = _block_scales(X_SCALE, W_SCALE, off_m, off_n, kb, M, N, sxm, sxk, swn,
                                       swk, BLOCK_M, BLOCK_N)
            acc = _mma(acc, a, b, xs, ws, SCALING, PRECISION, UPCAST, BLOCK_N, BLOCK_K)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = _epilogue(acc, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N,
                        BIAS, X_SCALE, W_SCALE, sxm, swn, HAS_BIAS, SCALING)
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            C.store([off_m, off_n], left.to(C.dtype))
            C.store([off_m, off_n + BLOCK_N // 2], right.to(C.dtype))
        else:
            C.store([off_m, off_n], acc.to(C.dtype))


# ----------------------------------------------------------------------------- launchers

class GemmConfig(NamedTuple):
    """One launch config; the dispatch table stores these as plain tuples."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    warps: int = 8
    stages: int = 3
    flatten: bool = True    # TMA path: one pipelined loop over tiles and K steps
    subtile: bool = False   # TMA path: store the output tile in two halves


@functools.lru_cache(maxsize=None)
def _device_facts(device: torch.device) -> tuple[bool, int]:
    """(Hopper-class NVIDIA GPU, SM count) for a GPU; the interpreter: (False, 2)."""
    if device.type != "cuda" or INTERPRETED:
        return False, 2
    props = torch.cuda.get_device_properties(device)
    return torch.version.hip is None and props.major == 9, props.multi_processor_count


def _layout(a: torch.Tensor, b: torch.Tensor) -> str:
    """BLAS-style letters for a then b: a is ``n`` when its rows (K) are contiguous, b is ``t``
    when its columns are (b is then a transposed row-major matrix, like nn.Linear's weight.T)."""
    return ("n" if a.stride(1) == 1 else "t") + ("t" if b.stride(0) == 1 else "n")


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float8_e4m3fn: "fp8"}


@functools.lru_cache(maxsize=4096)   # looked up on every call, up to four times
def shape_class(layout: str, kind: str, M: int, N: int, K: int) -> str:
    """The dispatch table's key: layout, operand kind (``bf16``, ``fp8``, ``fp8-block``, ...)
    and the sizes rounded up to powers of 2 (16 at least)."""
    m, n, k = (next_pow2(max(v, 16)) for v in (M, N, K))
    return f"{layout} {kind} {m}x{n}x{k}"


def _tuned(key: str) -> dict:
    return TUNED.get(key) or {}


def default_config(kind: str, M: int, N: int, K: int, device: torch.device,
                   tma: bool) -> GemmConfig:
    """The config for a class the table does not tune."""
    if device.type == "cpu":
        # The interpreter pays per program and per loop trip, not per element: few big tiles.
        m, n = (min(64, max(16, next_pow2(v))) for v in (M, N))
        k = SCALE_BLOCK if kind == "fp8-block" else min(64, max(16, next_pow2(K)))
        return GemmConfig(m, n, k, 8, 1, 1)
    if kind == "fp8-block":
        # Two 128x128 fp32 tiles (sum and 128-deep partial) per program: 8 warps hold them.
        return GemmConfig(128, 128, 128, 8, 8, 4 if tma else 3)
    if kind == "fp8":
        return GemmConfig(128, 256, 128, 8, 8, 3) if tma else GemmConfig(128, 128, 128, 8, 8, 3)
    if kind == "fp32":
        return GemmConfig(128, 128, 32, 8, 8, 3)
    if tma:
        # Triton's persistent-matmul tutorial's best Hopper tile for 16-bit operands.
        return GemmConfig(128, 256, 64, 8, 8, 3) if M > 64 else GemmConfig(64, 128, 64, 8, 4, 4)
    return GemmConfig(128, 128, 64, 8, 8, 3)


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA reads a 2-D tensor when it is not empty, its rows are contiguous, and its base and
    row stride are 16-byte aligned."""
    return all(t.numel() > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: it matters for fp32 operands only (the interpreter's are all
    fp32 upcasts, multiplied exactly)."""
    if INTERPRETED:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def run_gemm(op: str, kind: str, a, b, out, bias=None, x_scale=None, w_scale=None,
             scaling: int = NO_SCALES, config=None, tma=None, plan_key=None) -> torch.Tensor:
    """Launch ``out = a @ b (+ bias)`` (with fp8 scales) on the path and config that fit;
    record the path under ``op``. ``tma``: None picks (Hopper and aligned), True asks for the
    tensor-descriptor kernel where the layout allows (the interpreter runs it too), False the
    pointer kernel. ``plan_key``: keep the launch under it in ``_gemm_plans`` (see matmul)."""
    M, K = a.shape
    N = b.shape[1]
    hopper, sms = _device_facts(a.device)
    a_k_major = a.stride(1) == 1
    b_k_major = b.stride(0) == 1
    # TMA sees each operand in its contiguous layout: A (M, K) or (K, M), B (N, K) or (K, N).
    a_view = a if a_k_major else a.t()
    b_view = b.t() if b_k_major else b
    use_tma = (hopper if tma is None else tma) and K > 0 and _tma_ready(a_view, b_view, out)
    if config is None:
        tuned = _tuned(shape_class(_layout(a, b), kind, M, N, K)).get("config")
        config = GemmConfig(*tuned) if tuned and use_tma else default_config(
            kind, M, N, K, a.device, use_tma)
    config = GemmConfig(*config)
    if scaling == BLOCKWISE and config.block_k != SCALE_BLOCK:
        raise ValueError(f"aiter_dist.{op}: blockwise fp8 needs block_k={SCALE_BLOCK}, got "
                         f"config {config}")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    bias_arg = bias if bias is not None else out  # placeholders, never read (HAS_BIAS, SCALING)
    xs = x_scale if x_scale is not None else out
    ws = w_scale if w_scale is not None else out
    scale_strides = (*(x_scale.stride() if x_scale is not None else (0, 0)),
                     *(w_scale.stride() if w_scale is not None else (0, 0)))
    common = dict(HAS_BIAS=bias is not None, SCALING=scaling, PRECISION=_precision(a.dtype),
                  UPCAST=INTERPRETED, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m,
                  num_warps=config.warps, num_stages=config.stages)
    record_path(op, ("triton-interpreter" if INTERPRETED else "triton")
                + ("-tma" if use_tma else ""))
    if M == 0 or N == 0:
        return out
    if use_tma:
        tiles = cdiv(M, bm) * cdiv(N, bn)
        strides = (a_view.stride(0), b_view.stride(0), out.stride(0))
        # Eager calls build the descriptors on the GPU (no host encoding); a CUDA-graph capture
        # encodes them once on the host, where they cost nothing per replay and save the
        # kernel the ~2-4 us of building them (measured on small 1x1-conv GEMMs).
        if DEVICE_TMA and (INTERPRETED or not _capturing()):
            ensure_scratch_allocator()
            descs, device_desc = (a_view, b_view, out), True
            if plan_key is not None and scaling == NO_SCALES:
                # (a and b stand for their transposed views: a launch reads only the pointer)
                ints = (M, N, K, *scale_strides, *strides)
                _keep_plan(plan_key, plan_launch(
                    _gemm_tma_kernel, (min(sms, tiles),), a.device, a_view, b_view, out,
                    bias_arg, xs, ws, *ints, A_K_MAJOR=a_k_major, B_K_MAJOR=b_k_major,
                    NUM_SMS=sms, FLATTEN=config.flatten, SUBTILE=config.subtile,
                    DEVICE_DESC=True, **common), ints, True, op)
                return out
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor

            def desc(t, block):
                return TensorDescriptor(t, list(t.shape), list(t.stride()), block)

            descs = (desc(a_view, [bm, bk] if a_k_major else [bk, bm]),
                     desc(b_view, [bn, bk] if b_k_major else [bk, bn]),
                     desc(out, [bm, bn // 2 if config.subtile else bn]))
            device_desc = False
        launch(_gemm_tma_kernel, (min(sms, tiles),), a.device, *descs,
               bias_arg, xs, ws, M, N, K, *scale_strides, *strides,
               A_K_MAJOR=a_k_major, B_K_MAJOR=b_k_major, NUM_SMS=sms, FLATTEN=config.flatten,
               SUBTILE=config.subtile, DEVICE_DESC=device_desc, **common)
    else:
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        ints = (M, N, K, *a.stride(), *b.stride(), *out.stride(), *scale_strides)
        if plan_key is not None and scaling == NO_SCALES:
            _keep_plan(plan_key, plan_launch(_gemm_kernel, grid, a.device, a, b, out, bias_arg,
                                             xs, ws, *ints, EVEN_K=K % bk == 0, **common),
                       ints, False, op)
        else:
            launch(_gemm_kernel, grid, a.device, a, b, out, bias_arg, xs, ws, *ints,
                   EVEN_K=K % bk == 0, **common)
    return out


# (a, b, bias signatures, out dtype, config, tma, op, DEVICE_TMA, fp32 precision, current
# device) -> LaunchPlan whose extra is (ints, device descriptors, path): matmul's launch without
# the checks and the config lookup.
_gemm_plans = plan_cache()

# Whether a CUDA graph is being captured (never, interpreted: the CPU build's binding raises).
_graph_capturing = (lambda: False) if INTERPRETED else _capturing


def _planned_gemm(plan, a, b, bias, out_shape, out_dtype, op):
    """``a @ b (+ bias)`` from one of matmul's plans into a new ``out_shape`` tensor (None: the
    plan's (M, N)); a and b may stand for their 2-D or transposed views, as a launch reads only
    pointers. None where the plan cannot serve: a misaligned pointer, or a CUDA-graph capture
    with device-side descriptors (captures encode host ones)."""
    if (a.data_ptr() | b.data_ptr() | (0 if bias is None else bias.data_ptr())) & 15:
        return None
    ints, device_desc, path = plan.extra
    if device_desc:
        if _graph_capturing():
            return None
        ensure_scratch_allocator()
    out = torch.empty(out_shape or ints[:2], dtype=out_dtype, device=a.device)
    plan(a, b, out, out if bias is None else bias, out, out, *ints)
    record_path(op, path)
    return out


def _matmul_key(a, b, bias, out_dtype, config, tma, op):
    return (*signature(a), *signature(b), None if bias is None else signature(bias), out_dtype,
            config, tma, op, DEVICE_TMA,
            _precision(a.dtype) if a.dtype == torch.float32 else None, plan_device(a.device))


def _keep_plan(key, plan, ints, device_desc, op):
    if plan is not None:
        plan.extra = (ints, device_desc, last_path(op))
        _gemm_plans[key] = plan



def matmul(a, b, bias=None, *, out_dtype=None, config=None, tma=None, op="matmul"):
    """``a @ b + bias`` through our kernel: a (M, K), b (K, N), any strides; fp32 accumulation,
    output (M, N) contiguous in ``out_dtype`` (default a's). The caller checks the inputs."""
    try:
        key = _matmul_key(a, b, bias, out_dtype, config, tma, op)
        plan = _gemm_plans.get(key)
    except TypeError:  # (a config given as a list)
        key = plan = None
    if plan is not None:
        out = _planned_gemm(plan, a, b, bias, None, out_dtype or a.dtype, op)
        if out is not None:
            return out
    M, N = a.shape[0], b.shape[1]
    out = torch.empty(M, N, dtype=out_dtype or a.dtype, device=a.device)
    kind = DTYPE_NAMES[a.dtype]
    return run_gemm(op, kind, a, b, out, bias, config=config, tma=tma, plan_key=key)


def _autocast_dtype(x) -> torch.dtype | None:
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def compute_dtype(x) -> torch.dtype:
    """The dtype a linear of ``x`` multiplies in: autocast's when it is on, else x's."""
    return _autocast_dtype(x) or x.dtype


def autocast_inputs(x, weight, bias):
    """What autocast would hand F.linear: the three in autocast's dtype (when it is on)."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return x, weight, bias
    return (x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)


def check_linear_inputs(op: str, x, weight, bias=None) -> None:
    """The checks of ``x @ weight.T + bias`` (weight in nn.Linear layout)."""
    check_tensor(op, "input", x)
    check_tensor(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"aiter_dist.{op}: weight must be 2-D (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"aiter_dist.{op}: input's last dimension {x.shape[-1]} must equal "
                         f"weight's in_features {weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)}, computing input @ weight.T)")
    check_same_device(op, input=x, weight=weight, bias=bias)
    if bias is not None:
        check_tensor(op, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"aiter_dist.{op}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if _autocast_dtype(x) is not None:
        return  # autocast casts them to one dtype
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"aiter_dist.{op}: input dtype {x.dtype} differs from {name} dtype "
                            f"{t.dtype}; cast one of them (or run under torch.autocast)")


def linear_backends(op: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                    backend: str, prefer: str) -> tuple[str, str, str]:
    """Who serves the forward, dgrad and wgrad of an (M tokens, N out, K in) linear:
    ``"triton"`` or ``"vendor"``. ``backend`` forces one; ``"auto"`` takes the table's winner
    for the pass's shape class, else ``prefer``. CPU tensors: our kernel where the interpreter
    runs it (and ours is preferred or forced), else the vendor's."""
    if backend not in BACKENDS:
        raise ValueError(f"aiter_dist.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vendor" or (backend == "triton" and not runs_triton(op, device)):
        return ("vendor",) * 3
    if backend == "triton":
        return ("triton",) * 3
    if device.type == "cpu":
        return ((prefer if INTERPRETED else "vendor"),) * 3
    kind = DTYPE_NAMES[dtype]
    passes = (("nt", M, N, K), ("nn", M, K, N), ("tn", N, K, M))
    winners = (_tuned(shape_class(layout, kind, m, n, k)).get("winner")
               for layout, m, n, k in passes)
    return tuple(w if w in ("triton", "vendor") else prefer for w in winners)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, features): a view where the leading dims flatten, and a layout the kernel reads."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if 1 in t2.stride() else t2.contiguous()


def linear_fwd(x2, weight, bias, backend, op="linear"):
    """out = x2 @ weight.T + bias, by ``backend``; the path is recorded under ``op``."""
    if backend == "vendor":
        record_path(op, "torch.linear")
        return F.linear(x2, weight, bias)
    return matmul(x2, weight.t(), bias, op=op)


def linear_dgrad(dy2, weight, backend, op="linear"):
    """dx = dy2 @ weight (weight read as stored: b is N-major), recorded under ``op.dgrad``."""
    if backend == "vendor":
        record_path(op + ".dgrad", "torch.matmul")
        return dy2 @ weight
    return matmul(dy2, weight, op=op + ".dgrad")


def linear_wgrad(dy2, x2, backend, op="linear"):
    """dW = dy2.T @ x2, a reduction over tokens (a = dy2.T is M-major), recorded under
    ``op.wgrad``."""
    if backend == "vendor":
        record_path(op + ".wgrad", "torch.matmul")
        return dy2.t() @ x2
    return matmul(dy2.t(), x2, op=op + ".wgrad")


# ----------------------------------------------------------------------------- autograd

class LinearFunction(torch.autograd.Function):
    """``x @ weight.T + bias``; ``backends`` = who serves (forward, dgrad, wgrad), ``op`` the
    name their paths are recorded under (``op``, ``op.dgrad``, ``op.wgrad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, backends, op):
        x2 = _rows(x)
        out = linear_fwd(x2, weight, bias, backends[0], op)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.backends, ctx.op = x.shape, backends, op
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dy2 = _rows(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = linear_dgrad(dy2, weight, ctx.backends[1], ctx.op).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = linear_wgrad(dy2, x2, ctx.backends[2], ctx.op)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               backends: str, op: str) -> torch.Tensor:
    # backends: the (forward, dgrad, wgrad) backends joined by commas (schemas take no str list)
    out = linear_fwd(_rows(x), weight, bias, backends.split(",")[0], op)
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(x, weight, bias, backends, op):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("aiter_dist::linear_bwd", mutates_args=())
def _linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   backends: str, op: str, need_dx: bool, need_dw: bool,
                   need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); an empty tensor for each one not needed."""
    backends = backends.split(",")
    dy2 = _rows(dy)
    # (a fresh empty tensor for each output not needed: an op's outputs may not alias each other)
    dx = linear_dgrad(dy2, weight, backends[1], op).view(x.shape) if need_dx else x.new_empty(0)
    dw = linear_wgrad(dy2, _rows(x), backends[2], op) if need_dw else x.new_empty(0)
    db = dy2.sum(0, dtype=torch.float32).to(weight.dtype) if need_db else x.new_empty(0)
    return dx, dw, db


@_linear_bwd_op.register_fake
def _(dy, x, weight, backends, op, need_dx, need_dw, need_db):
    # Contiguous, as the real outputs are, whatever the inputs' strides.
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_db else x.new_empty(0))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, backends, op = inputs
    ctx.save_for_backward(x, weight)
    ctx.args, ctx.has_bias = (backends, op), bias is not None


def _linear_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = torch.ops.aiter_dist.linear_bwd(dy, x, weight, *ctx.args, need[0], need[1],
                                                 ctx.has_bias and need[2])
    return (dx if need[0] else None, dw if need[1] else None,
            db if ctx.has_bias and need[2] else None, None, None)


torch.library.register_autograd("aiter_dist::linear", _linear_backward,
                                setup_context=_linear_setup)


def apply_linear(x, weight, bias, backends, op):
    """``x @ weight.T + bias`` by ``backends`` (forward, dgrad, wgrad): the custom op when
    compiling, the autograd Function when a gradient is wanted, else the forward launcher."""
    if compiling():
        return torch.ops.aiter_dist.linear(x, weight, bias, ",".join(backends), op)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearFunction.apply(x, weight, bias, backends, op)
    # Nothing to differentiate: the launcher alone (autograd's Function costs host time).
    return linear_fwd(_rows(x), weight, bias, backends[0], op).view(*x.shape[:-1],
                                                                   weight.shape[0])


# ----------------------------------------------------------------------------- functional API

def linear(x, weight, bias=None, *, backend="auto"):
    """``F.linear(x, weight, bias)`` = ``x @ weight.T + bias`` over any leading dims of ``x``,
    forward, dgrad and wgrad through our Triton GEMM.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    ``backend``: ``"auto"`` (ours, except shape classes where the tuned table says the vendor
    GEMM is faster), ``"triton"`` (ours) or ``"vendor"`` (cuBLAS / hipBLASLt / CPU BLAS).
    ``aiter_dist.last_path("linear")`` (and ``"linear.dgrad"``, ``"linear.wgrad"``) name the
    implementation that served.
    """
    op = "linear"
    if compiling():  # (traced code keeps no host caches: the custom op, below)
        key = known = None
    else:
        try:
            key = (*signature(x), *signature(weight), None if bias is None else signature(bias),
                   backend, DEVICE_TMA,
                   _precision(x.dtype) if x.dtype == torch.float32 else None,
                   plan_device(x.device))
            known = _linear_plans.get(key)
        except (AttributeError, TypeError):  # not tensors (or an unhashable backend): the checks
            key = known = None
    if known is not None and _autocast_dtype(x) is None:
        backends, plan, out_shape = known
        if plan is not None and not (
                (x.requires_grad or weight.requires_grad or (bias is not None and
                                                             bias.requires_grad))
                and torch.is_grad_enabled()):
            # The forward GEMM from its plan: x and weight stand for x2 and weight.T.
            out = _planned_gemm(plan, x, weight, bias, out_shape, x.dtype, op)
            if out is not None:
                return out
        return apply_linear(x, weight, bias, backends, op)
    check_linear_inputs(op, x, weight, bias)
    cast = autocast_inputs(x, weight, bias)
    backends = linear_backends(op, math.prod(x.shape[:-1]), weight.shape[0], weight.shape[1],
                               cast[0].dtype, x.device, backend, prefer="triton")
    out = apply_linear(*cast, backends, op)
    if key is not None and _autocast_dtype(x) is None:  # (autocast's choice is made per call)
        _linear_plans[key] = (backends, _forward_plan(x, weight, bias, backends), out.shape)
    return out


# (x, weight, bias signatures, backend) -> (the (forward, dgrad, wgrad) backends, the forward
# GEMM's plan or None, the output's shape), for inputs that passed the checks.
_linear_plans = plan_cache()


def _forward_plan(x, weight, bias, backends):
    """The plan matmul keeps for linear's forward GEMM of these inputs, where its launch can
    take x and weight as they are (the 2-D view of x is x's own memory)."""
    if backends[0] != "triton":
        return None
    x2 = _rows(x)
    if x2.data_ptr() != x.data_ptr():
        return None
    return _gemm_plans.get(_matmul_key(x2, weight.t(), bias, None, None, None, "linear"))


__all__ = ["linear", "matmul", "run_gemm", "gemm_ref", "linear_ref", "LinearFunction",
           "GemmConfig", "shape_class", "default_config", "linear_backends",
           "check_linear_inputs", "autocast_inputs", "compute_dtype"]
