"""conv2d: forward, data gradient (dgrad) and weight gradient (wgrad) as implicit GEMMs in Triton.

    conv2d(x, w, b)   F.conv2d semantics: x (N, C_in, H, W), w (C_out, C_in/groups, KH, KW)

All three passes work on NHWC data (``channels_last`` is the fast layout; the kernels read any
strides, so contiguous NCHW is correct too) and accumulate in fp32:

* forward: an implicit GEMM with M = N*OH*OW output pixels, N = C_out/groups, K =
  KH*KW*C_in/groups. The input tile is gathered per (kh, kw) tap with masks for the padding, the
  weight is read as (C_out, KH, KW, C_in) (its channels_last view); the bias is fused. When a
  group has fewer than 16 input channels (the RGB stem) the K dimension is flattened over
  (kh, kw, c) instead, so a 16-deep tile is not mostly padding.
* dgrad: a transposed convolution as an implicit GEMM over dy, split by stride phase: the dx
  pixels with ``ih % stride_h == ph`` (and likewise for w) form one sub-problem whose
  contributing taps are the ones with ``(ph + pad - kh*dil) % stride == 0``; no work is spent on
  the zeros a dilated dy would hold. One launch covers every phase (grid axis 2).
* wgrad: M = C_out/groups, N = KH*KW*C_in/groups, the reduction over the N*OH*OW pixels split
  across programs (split-K); each split writes an fp32 partial into a workspace, the partials are
  summed afterwards in a fixed order: deterministic. dbias comes from the same pass (the row
  sums of the dy tiles), also by split partials. On Hopper (16-bit, one group, channels a
  multiple of 8) the wgrad runs on ``_conv2d_wgrad_tma_kernel`` instead: the pixels are reduced
  in boxes of BOX_H x BOX_W output pixels of one image, both operands loaded by TMA from 4-D
  descriptors; for tap (kh, kw) the input under a box is a box of the input's stride phase
  (a view with strides multiplied by the stride), and the copy engine's zero fill is the
  padding. A pointwise conv over dense NHWC is one row of N*H*W pixels. Recorded as
  ``triton-tma``.
* depthwise (one input channel per group: ``groups == C_in``): direct kernels, no GEMM (a
  1-deep reduction would waste the tensor cores): elementwise taps for the forward and wgrad,
  a masked gather for dgrad (stride phases are not split there).
* pointwise (1x1, stride 1, no padding, one group, 16-bit, NHWC in and out): the forward and
  dgrad are plain GEMMs over (N*H*W, C) views and run on the GEMM kernel (``kernels/gemm.py``);
  recorded as ``triton-gemm`` (``-tma`` where it used tensor descriptors).

Dispatch: ``default_backend`` (env ``AITER_DIST_CONV_BACKEND``): ``"triton"`` (ours),
``"vendor"`` (``F.conv2d`` / ``aten.convolution_backward``: cuDNN / MIOpen) or ``"auto"``: per
pass, the winner in ``TUNED`` for the exact conv shape (measured on an H200 for ResNet-50's
bf16 convs at batch 32 and 128: ``kernels/conv_tuned.py``), else ours.
float64 inputs, empty batches and CPU tensors on a GPU machine take the vendor path, recorded.
``last_path("conv2d")``, ``last_path("conv2d_dgrad")``, ``last_path("conv2d_wgrad")`` say who
served each pass.

fp32 inputs multiply in full fp32 (``input_precision="ieee"``), not TF32. The GPU configs
(``fwd_config``, ``dgrad_config``, ``wgrad_config``) are guesses; ``TUNED_CONFIGS`` holds the
measured winners of the shapes in the table.

This file: configs, launchers, the autograd Function, the torch.library ops and ``conv2d``; the
jit kernels and the reference are in ``conv_kernels.py``, the measured table in
``conv_tuned.py``.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._runtime import (FLOAT_DTYPES, INTERPRETED, cdiv, check_same_device, check_tensor, compiling,
                       ensure_scratch_allocator,
                       last_path, launch, next_pow2, plan_cache, plan_device, plan_launch,
                       record_path, signature)
from .conv_tuned import TUNED as _MEASURED
from .conv_kernels import (  # noqa: F401  (conv2d_ref: part of this module's API)
    _conv2d_dgrad_kernel, _conv2d_fwd_kernel, _conv2d_wgrad_kernel, _dw_conv2d_dgrad_kernel,
    _conv2d_wgrad_tma_kernel, _dw_conv2d_fwd_kernel, _dw_conv2d_wgrad_kernel, _sum_partials_kernel,
    conv2d_ref)
from . import gemm as _gemm
from .gemm import DTYPE_NAMES, GemmConfig, _device_facts, run_gemm

BACKENDS = ("auto", "triton", "vendor")
default_backend = os.environ.get("AITER_DIST_CONV_BACKEND", "auto")

# Per conv shape (``conv_key``): {"fwd": "triton"|"vendor", "dgrad": ..., "wgrad": ...}, the
# measured winners ``backend="auto"`` follows (``kernels/conv_tuned.py``).
TUNED: dict = {key: {ps: v[0] for ps, v in passes.items()} for key, passes in _MEASURED.items()}
# Per (pass, conv_key): a ConvConfig tuple replacing the built-in guess, or ("gemm", *GemmConfig)
# for a pointwise conv served by the GEMM kernel with that config.
TUNED_CONFIGS: dict = {(ps, key): tuple(v[1]) for key, passes in _MEASURED.items()
                       for ps, v in passes.items() if v[1] is not None}

# A 1x1, stride-1, unpadded, ungrouped 16-bit conv over NHWC tensors is a plain GEMM (pixels x
# channels): its forward and dgrad run on the GEMM kernel (``kernels/gemm.py``, TMA on Hopper)
# instead of the gathering implicit-GEMM kernel. A ``TUNED_CONFIGS`` entry for the shape that is
# a conv config turns it off.
GEMM_1X1 = True

# Copy a non-channels_last input / weight / dy to channels_last before a compiled kernel: the
# kernels read any strides, but a channel stride other than 1 makes every load a gather.
GPU_NHWC_COPY = True

# wgrad on the TMA kernel (``_conv2d_wgrad_tma_kernel``) where it applies: Hopper (and the
# interpreter), 16-bit, one group, dy and x NHWC with 16-byte aligned pixels (channels a multiple
# of 8), device-side descriptors allowed (``gemm.DEVICE_TMA``). Env
# ``AITER_DIST_CONV_WGRAD_TMA=0``: the pointer kernel always.
WGRAD_TMA = os.environ.get("AITER_DIST_CONV_WGRAD_TMA", "1") == "1"

_PATH = "triton-interpreter" if INTERPRETED else "triton"
CONV_DTYPES = FLOAT_DTYPES + (torch.float64,)


class ConvConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3
    group_m: int = 8
    split: int = 1   # wgrad: programs sharing the pixel reduction
    tma: bool | None = None  # wgrad on TMA: None where it applies, True insists, False never


# ----------------------------------------------------------------------------- geometry and checks

class ConvGeom(NamedTuple):
    """Everything a launch needs about one conv, from shapes and parameters (host ints)."""
    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    OH: int
    OW: int
    groups: int
    stride: tuple   # (h, w)
    padding: tuple  # (top, bottom, left, right)
    dilation: tuple  # (h, w)

    @property
    def ci(self):  # input channels per group
        return self.C_in // self.groups

    @property
    def co(self):  # output channels per group
        return self.C_out // self.groups

    @property
    def depthwise(self):
        return self.ci == 1


def _pair(op: str, name: str, v) -> tuple:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (v[0], v[1])
    raise ValueError(f"aiter_dist.{op}: {name} must be an int or a pair of ints, got {v!r}")


def conv_params(op: str, input, weight, bias, stride, padding, dilation, groups):
    """Check the inputs of ``conv2d`` and normalize the parameters: ((sh, sw), (top, bottom,
    left, right), (dh, dw)). Raises ValueError / TypeError naming ``op`` and the fix."""
    check_tensor(op, "input", input, dtypes=CONV_DTYPES)
    check_tensor(op, "weight", weight, dtypes=CONV_DTYPES)
    if input.dim() != 4:
        raise ValueError(f"aiter_dist.{op}: input must be 4-D (N, C_in, H, W), got shape "
                         f"{tuple(input.shape)}; for one unbatched (C, H, W) image pass "
                         f"input.unsqueeze(0)")
    if weight.dim() != 4:
        raise ValueError(f"aiter_dist.{op}: weight must be 4-D (C_out, C_in/groups, KH, KW), "
                         f"got shape {tuple(weight.shape)}")
    check_same_device(op, input=input, weight=weight, bias=bias)
    if weight.dtype != input.dtype:
        raise TypeError(f"aiter_dist.{op}: input dtype {input.dtype} differs from weight dtype "
                        f"{weight.dtype}; cast one of them (e.g. weight.to(input.dtype))")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"aiter_dist.{op}: groups must be a positive int, got {groups!r}")
    c_in, c_out = input.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"aiter_dist.{op}: groups={groups} must divide both input channels "
                         f"({c_in}) and output channels ({c_out}); pick a common divisor")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"aiter_dist.{op}: input has {c_in} channels but weight "
                         f"{tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups}; weight must be (C_out, C_in/groups, KH, KW)")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=CONV_DTYPES)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"aiter_dist.{op}: bias must have shape ({c_out},) (one per output "
                             f"channel), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"aiter_dist.{op}: bias dtype {bias.dtype} differs from input dtype "
                            f"{input.dtype}; cast one of them")
    stride = _pair(op, "stride", stride)
    dilation = _pair(op, "dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"aiter_dist.{op}: stride {stride} and dilation {dilation} must be >= 1")
    kh, kw = weight.shape[2], weight.shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"aiter_dist.{op}: padding='same' needs stride 1 (as "
                                 f"F.conv2d), got stride {stride}; give the padding as ints")
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            # Odd totals put the extra row / column at the bottom / right, as F.conv2d does.
            pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"aiter_dist.{op}: padding must be 'valid', 'same', an int or a "
                             f"pair of ints, got {padding!r}")
    else:
        ph, pw = _pair(op, "padding", padding)
        if ph < 0 or pw < 0:
            raise ValueError(f"aiter_dist.{op}: padding must be >= 0, got {(ph, pw)}")
        pad = (ph, ph, pw, pw)
    h, w = input.shape[2], input.shape[3]
    if (h + pad[0] + pad[1] < dilation[0] * (kh - 1) + 1
            or w + pad[2] + pad[3] < dilation[1] * (kw - 1) + 1):
        raise ValueError(f"aiter_dist.{op}: the (dilated) kernel {kh}x{kw} (dilation "
                         f"{dilation}) is larger than the padded input {h}x{w} (padding "
                         f"{pad}); pad more or use a smaller kernel")
    return stride, pad, dilation


def conv_geometry(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeom:
    N, C_in, H, W = x_shape
    C_out, _, KH, KW = w_shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return ConvGeom(N, C_in, H, W, C_out, KH, KW, OH, OW, groups, tuple(stride), tuple(padding),
                    tuple(dilation))


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last when ``t`` is laid out so (and not also plainly contiguous), else
    contiguous: the layout the outputs take, as cuDNN's do."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _like_weight(weight: torch.Tensor) -> torch.Tensor:
    """An empty dweight with the weight's exact strides: a 1x1 channels_last weight is also
    plainly contiguous, and DDP's gradient buckets are views with the parameter's own strides
    (any other strides cost a copy per step and a warning)."""
    return torch.empty_like(weight, memory_format=torch.preserve_format)


@functools.lru_cache(maxsize=4096)   # every call of a tuned op looks its shape up
def conv_key(g: ConvGeom, dtype: torch.dtype) -> str:
    """The key of ``TUNED`` / ``TUNED_CONFIGS``: the conv's exact shape and dtype."""
    s, p, d = g.stride, g.padding, g.dilation
    return (f"{str(dtype).replace('torch.', '')} {g.N}x{g.C_in}x{g.H}x{g.W} -> {g.C_out} "
            f"k{g.KH}x{g.KW} s{s[0]},{s[1]} p{p[0]},{p[1]},{p[2]},{p[3]} d{d[0]},{d[1]} "
            f"g{g.groups}")


def _vendor_reason(x: torch.Tensor) -> str | None:
    """Why a call cannot run our kernels (None: it can)."""
    if x.dtype == torch.float64:
        return ("float64 input: computed by PyTorch in float64; the Triton kernels take "
                "float32, float16 and bfloat16")
    if x.numel() == 0:
        return "empty input: nothing to launch"
    if x.device.type == "cpu" and not INTERPRETED:
        return "CPU tensor on a GPU machine: Triton runs compiled here"
    return None


def conv_backends(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups,
                  backend: str | None = None) -> tuple:
    """Who serves (forward, dgrad, wgrad): ``"triton"`` or ``"vendor"``. ``backend`` (default
    ``default_backend``): ``"triton"`` and ``"vendor"`` force one, ``"auto"`` takes ``TUNED``'s
    winner for the conv's shape, else ours. Calls our kernels cannot serve (float64, empty, CPU
    tensors on a GPU machine) get the vendor's whatever ``backend`` says. Records nothing: the
    launchers record the path that ran."""
    backend = default_backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"aiter_dist.conv2d: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vendor" or _vendor_reason(x) is not None:
        return ("vendor",) * 3
    if backend == "triton" or not TUNED or x.device.type == "cpu":
        return ("triton",) * 3
    g = conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    won = TUNED.get(conv_key(g, x.dtype)) or {}
    return tuple(won.get(p, "triton") for p in ("fwd", "dgrad", "wgrad"))


# ----------------------------------------------------------------------------- configs

def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, next_pow2(v)))


def _sms(device: torch.device) -> int:
    from .gemm import _device_facts

    return _device_facts(device)[1]


def fwd_config(g: ConvGeom, dtype: torch.dtype, device: torch.device) -> ConvConfig:
    """Tiles of the forward: BLOCK_M output pixels x BLOCK_N output channels x BLOCK_K of
    (channels of one tap, or flattened taps when a group has < 16 input channels).
    Depthwise: BLOCK_M pixels x BLOCK_N channels, no BLOCK_K."""
    M = g.N * g.OH * g.OW
    if g.depthwise:
        if device.type == "cpu":
            return ConvConfig(_clamp_pow2(M, 16, 128), _clamp_pow2(g.C_out, 16, 64), 1, 1)
        return ConvConfig(64, _clamp_pow2(g.C_out, 16, 64), 1, 4)
    k = g.ci if g.ci >= 16 else g.KH * g.KW * g.ci
    if device.type == "cpu":
        # The interpreter pays per program and per loop trip, not per element: big tiles.
        return ConvConfig(_clamp_pow2(M, 16, 128), _clamp_pow2(g.co, 16, 64),
                          _clamp_pow2(k, 16, 64), 1, 1)
    bn = _clamp_pow2(g.co, 16, 128)
    bk = _clamp_pow2(k, 16, 32 if dtype == torch.float32 else 64)
    bm = 128 if M >= 128 else _clamp_pow2(M, 16, 128)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return ConvConfig(bm, bn, bk, warps, 3 if bk >= 64 else 4)


def dgrad_config(g: ConvGeom, dtype: torch.dtype, device: torch.device) -> ConvConfig:
    """Tiles of dgrad: BLOCK_M input pixels of one stride phase x BLOCK_N input channels x
    BLOCK_K output channels of one tap. Depthwise: BLOCK_M pixels x BLOCK_N channels."""
    M = g.N * cdiv(g.H, g.stride[0]) * cdiv(g.W, g.stride[1])
    if g.depthwise:
        if device.type == "cpu":
            return ConvConfig(_clamp_pow2(g.N * g.H * g.W, 16, 128), _clamp_pow2(g.C_in, 16, 64),
                              1, 1)
        return ConvConfig(64, _clamp_pow2(g.C_in, 16, 64), 1, 4)
    if device.type == "cpu":
        return ConvConfig(_clamp_pow2(M, 16, 128), _clamp_pow2(g.ci, 16, 64),
                          _clamp_pow2(g.co, 16, 64), 1, 1)
    bn = _clamp_pow2(g.ci, 16, 128)
    bk = _clamp_pow2(g.co, 16, 32 if dtype == torch.float32 else 64)
    bm = 128 if M >= 128 else _clamp_pow2(M, 16, 128)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return ConvConfig(bm, bn, bk, warps, 3 if bk >= 64 else 4)


def wgrad_config(g: ConvGeom, dtype: torch.dtype, device: torch.device) -> ConvConfig:
    """Tiles of wgrad: BLOCK_M output channels x BLOCK_N (input channels of one tap, or
    flattened taps when a group has < 16) x BLOCK_K pixels, and ``split`` programs sharing the
    pixels (fp32 partials of the whole weight each). Depthwise: BLOCK_M pixels x BLOCK_N
    channels, one program per (channel block, tap, split)."""
    P = g.N * g.OH * g.OW
    if g.depthwise:
        cpu = device.type == "cpu"
        bp, bc = _clamp_pow2(P, 16, 128) if cpu else 64, _clamp_pow2(g.C_out, 16, 64)
        programs = cdiv(g.C_out, bc) * g.KH * g.KW
        split = max(1, min(cdiv(2 * _sms(device), programs), cdiv(P, bp * 8)))
        return ConvConfig(bp, bc, 1, 1 if cpu else 4, 1, 1, split)
    n = g.ci if g.ci >= 16 else g.KH * g.KW * g.ci
    if device.type == "cpu":
        bm, bn, bk = _clamp_pow2(g.co, 16, 64), _clamp_pow2(n, 16, 64), _clamp_pow2(P, 16, 64)
        # Two splits where there is work for two: the partial sums are exercised on CPU too.
        return ConvConfig(bm, bn, bk, 1, 1, 1, min(2, cdiv(P, bk)))
    bm = _clamp_pow2(g.co, 16, 128)
    bn = _clamp_pow2(n, 16, 128)
    bk = 32 if dtype == torch.float32 else 64
    cols = g.KH * g.KW * cdiv(g.ci, bn) if g.ci >= 16 else cdiv(n, bn)
    tiles = cdiv(g.co, bm) * cols * g.groups
    # About one program per SM: each split adds an fp32 copy of dweight to write and sum, and
    # at batch 32 (ResNet-50, H200) half of a two-per-SM split, or one split, won on 15 of 23
    # shapes (l4.3x3: 27.8 us tuned with one split, 55.2 with the two-per-SM default).
    split = max(1, min(cdiv(_sms(device), tiles), cdiv(P, bk * 8)))
    # Keep the fp32 workspace under ~256 MB.
    split = max(1, min(split, (256 << 20) // max(1, 4 * g.C_out * g.KH * g.KW * g.ci)))
    warps = 8 if bm * bn >= 128 * 128 else 4
    return ConvConfig(bm, bn, bk, warps, 3, 8, split)


_configs: dict = {}


def _config(kind: str, fn, g: ConvGeom, dtype, device) -> ConvConfig:
    """The config of one pass, computed once per (pass, shape, dtype, device type); a
    ``TUNED_CONFIGS`` entry wins."""
    key = (kind, g, dtype, device.type)
    cfg = _configs.get(key)
    if cfg is None:
        tuned = TUNED_CONFIGS.get((kind, conv_key(g, dtype))) if TUNED_CONFIGS else None
        if tuned and tuned[0] == "gemm":
            tuned = None     # the GEMM kernel's config; this pass's own is the guess
        cfg = _configs[key] = ConvConfig(*tuned) if tuned else fn(g, dtype, device)
    return cfg


# tl.dot's input_precision: full fp32 products for fp32 operands (no TF32), so fp32 results
# match on CPU and GPU; 16-bit operands ignore it.
PRECISION = "ieee"


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """On the GPU, a channels_last copy of a 4-D tensor whose channel stride is not 1."""
    if INTERPRETED or not GPU_NHWC_COPY or t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- vendor paths

def _gemm_view(t: torch.Tensor) -> torch.Tensor | None:
    """(N*H*W, C) view of a channels_last (N, C, H, W) tensor, else None."""
    if not t.is_contiguous(memory_format=torch.channels_last):
        return None
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)   # a view: NHWC memory is dense


def _gemm_route(op: str, g: ConvGeom, dtype: torch.dtype, kind: str, config):
    """None when this pass runs on the conv kernels, else the GemmConfig it runs with on the
    GEMM kernel (``()``: the GEMM's own choice). ``config``: the caller's, if any."""
    pointwise = (GEMM_1X1 and dtype in (torch.bfloat16, torch.float16) and g.KH == 1
                 and g.KW == 1 and g.stride == (1, 1) and g.padding == (0, 0, 0, 0)
                 and g.groups == 1)
    if isinstance(config, GemmConfig):
        if not pointwise:
            raise ValueError(f"aiter_dist.{op}: a GemmConfig serves 1x1 stride-1 unpadded 16-bit "
                             f"convs only; pass a ConvConfig")
        return config
    if not pointwise or config is not None:
        return None
    tuned = TUNED_CONFIGS.get((kind, conv_key(g, dtype))) if TUNED_CONFIGS else None
    if tuned is None:
        return ()
    return GemmConfig(*tuned[1:]) if tuned[0] == "gemm" else None


def _pointwise_gemm(op: str, a: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                    transpose_w: bool, bias=None, config=()) -> bool:
    """out = a @ W(.T) on the GEMM kernel (``config``: a GemmConfig, or () for its own choice)
    where out is dense channels_last (a is copied to it if need be); False (and nothing
    written) when out is not."""
    out2 = _gemm_view(out)
    if out2 is None:
        return False
    a2 = _gemm_view(a)
    if a2 is None:   # any other layout: one NHWC copy
        a2 = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    w2 = weight.reshape(weight.shape[0], weight.shape[1])   # (C_out, C_in)
    run_gemm(op, DTYPE_NAMES[a.dtype], a2, w2.t() if transpose_w else w2, out2, bias,
             config=config or None)
    record_path(op, _PATH + "-gemm" + ("-tma" if last_path(op).endswith("-tma") else ""))
    return True


def _vendor_padded(x, padding):
    """(x padded explicitly where the padding is asymmetric, symmetric (h, w) padding)."""
    t, b, l, r = padding
    if t == b and l == r:
        return x, [t, l]
    return F.pad(x, (l, r, t, b)), [0, 0]


def _vendor_fwd(x, weight, bias, stride, padding, dilation, groups):
    xp, pad = _vendor_padded(x, padding)
    y = F.conv2d(xp, weight, bias, stride, pad, dilation, groups)
    return y.contiguous(memory_format=memory_format(x))


def _vendor_bwd(dy, x, weight, stride, padding, dilation, groups, need_dx, need_dw, need_db):
    xp, pad = _vendor_padded(x, padding)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy, xp, weight, [weight.shape[0]] if need_db else None, list(stride), pad,
        list(dilation), False, [0, 0], groups, [need_dx, need_dw, need_db])
    if dx is not None:
        if xp is not x:
            t, _, l, _ = padding
            dx = dx[:, :, t:t + x.shape[2], l:l + x.shape[3]]
        dx = dx.contiguous(memory_format=memory_format(x))
    if dw is not None and dw.stride() != weight.stride():
        dw = torch.empty_like(weight).copy_(dw)  # the weight's exact strides (see _like_weight)
    return dx, dw, db


# ----------------------------------------------------------------------------- launchers

def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, backend="triton", *,
               config=None, keep=None):
    """Forward launcher: ``F.conv2d(x, weight, bias)`` with normalized parameters (``stride``
    (h, w), ``padding`` (top, bottom, left, right), ``dilation`` (h, w)); the caller checked the
    inputs (:func:`conv_params`). Output (N, C_out, OH, OW) in x's dtype and memory format.
    ``backend``: ``"triton"`` or ``"vendor"``; recorded as ``last_path("conv2d")``.
    ``keep``: conv2d's record of these inputs, where a launch plan of the direct kernel goes."""
    op = "conv2d"
    x_in, w_in = x, weight
    reason = _vendor_reason(x)
    if backend == "vendor" or reason is not None:
        record_path(op, "torch.conv2d", reason)
        return _vendor_fwd(x, weight, bias, stride, padding, dilation, groups)
    g = conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    y = torch.empty((g.N, g.C_out, g.OH, g.OW), dtype=x.dtype, device=x.device,
                    memory_format=memory_format(x))
    cfg = (config if config is not None and not isinstance(config, GemmConfig)
           else _config("fwd", fwd_config, g, x.dtype, x.device))
    x, weight = _nhwc(x), _nhwc(weight)
    gemm = _gemm_route(op, g, x.dtype, "fwd", config)
    if gemm is not None and _pointwise_gemm(op, x, y, weight, True, bias, gemm):
        return y
    bias_arg = bias if bias is not None else y   # placeholder, never read (HAS_BIAS)
    geo = (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])
    if g.depthwise:
        P = g.N * g.OH * g.OW
        launch(_dw_conv2d_fwd_kernel, (cdiv(P, cfg.block_m), cdiv(g.C_out, cfg.block_n)),
               x.device, x, weight, bias_arg, y, P, g.H, g.W, g.OH, g.OW, g.C_out, g.co,
               g.KH, g.KW, *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
               *y.stride(), *geo, HAS_BIAS=bias is not None, BLOCK_P=cfg.block_m,
               BLOCK_C=cfg.block_n, num_warps=cfg.warps)
        record_path(op, _PATH + "-depthwise")
        return y
    M = g.N * g.OH * g.OW
    grid = (cdiv(M, cfg.block_m) * cdiv(g.co, cfg.block_n), g.groups)
    ints = (M, g.H, g.W, g.OH, g.OW, g.ci, g.co, g.KH, g.KW, *x.stride(), *weight.stride(),
            *y.stride(), *geo)
    planned = keep is not None and x.data_ptr() == x_in.data_ptr() and (
        weight.data_ptr() == w_in.data_ptr())  # (a plan launches the inputs as given)
    plan = (plan_launch if planned else launch)(
        _conv2d_fwd_kernel, grid, x.device, x, weight, bias_arg, y, *ints,
        HAS_BIAS=bias is not None, FLAT_K=g.ci < 16, X_C1=x.stride(1) == 1,
        W_C1=weight.stride(1) == 1, PRECISION=PRECISION, UPCAST=INTERPRETED,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.warps, num_stages=cfg.stages)
    if planned and plan is not None:
        plan.extra = (tuple(y.shape), memory_format(x_in), ints)
        keep[2] = plan
    record_path(op, _PATH)
    return y


def conv2d_dgrad(dy, x, weight, stride, padding, dilation, groups, backend="triton", *,
                 config=None):
    """dx of ``conv2d``: (N, C_in, H, W) in x's dtype and memory format (``x`` gives the
    shape, layout and dtype; its values are not read). Recorded as ``last_path("conv2d_dgrad")``."""
    op = "conv2d_dgrad"
    reason = _vendor_reason(x)
    if backend == "vendor" or reason is not None:
        record_path(op, "torch.convolution_backward", reason)
        return _vendor_bwd(dy, x, weight, stride, padding, dilation, groups, True, False,
                           False)[0]
    g = conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    cfg = (config if config is not None and not isinstance(config, GemmConfig)
           else _config("dgrad", dgrad_config, g, x.dtype, x.device))
    dy, weight = _nhwc(dy), _nhwc(weight)
    gemm = _gemm_route(op, g, x.dtype, "dgrad", config)
    if gemm is not None and _pointwise_gemm(op, dy, dx, weight, False, None, gemm):
        return dx
    geo = (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])
    if g.depthwise:
        P = g.N * g.H * g.W
        launch(_dw_conv2d_dgrad_kernel, (cdiv(P, cfg.block_m), cdiv(g.C_in, cfg.block_n)),
               x.device, dy, weight, dx, P, g.H, g.W, g.OH, g.OW, g.C_in, g.co, g.KH, g.KW,
               *dy.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *dx.stride(),
               *geo, BLOCK_P=cfg.block_m, BLOCK_C=cfg.block_n, num_warps=cfg.warps)
        record_path(op, _PATH + "-depthwise")
        return dx
    sh, sw = g.stride
    HP, WP = cdiv(g.H, sh), cdiv(g.W, sw)
    M = g.N * HP * WP
    grid = (cdiv(M, cfg.block_m) * cdiv(g.ci, cfg.block_n), g.groups, sh * sw)
    launch(_conv2d_dgrad_kernel, grid, x.device, dy, weight, dx, M, g.H, g.W, g.OH, g.OW, HP,
           WP, g.ci, g.co, g.KH, g.KW, *dy.stride(), *weight.stride(), *dx.stride(), *geo,
           sh // math.gcd(sh, g.dilation[0]), sw // math.gcd(sw, g.dilation[1]),
           DY_C1=dy.stride(1) == 1, W_C1=weight.stride(1) == 1, PRECISION=PRECISION,
           UPCAST=INTERPRETED, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
           GROUP_M=cfg.group_m, num_warps=cfg.warps, num_stages=cfg.stages)
    record_path(op, _PATH)
    return dx


@functools.lru_cache(maxsize=1024)
def wgrad_box(oh: int, ow: int, block_k: int) -> tuple:
    """(BOX_H, BOX_W) of the TMA wgrad's reduction boxes, BOX_H * BOX_W = block_k output pixels
    of one image: the shape that wastes the fewest zero-filled pixels on an oh x ow output
    (the wider of equals: longer contiguous rows)."""
    best, box = -1.0, (1, block_k)
    bw = block_k
    while bw >= 1:
        bh = block_k // bw
        used = oh * ow / (cdiv(oh, bh) * bh * cdiv(ow, bw) * bw)
        if used > best + 1e-9:
            best, box = used, (bh, bw)
        bw //= 2
    return box


def _nhwc_strides(t: torch.Tensor) -> tuple:
    """(image, row, pixel) strides of an NHWC tensor for a descriptor: a size-1 dimension's
    stride is never stepped, so it takes the dense one (PyTorch may give it any value)."""
    n, c, h, w = t.shape
    dense = (h * w * c, w * c, c)
    return tuple(st if size > 1 else d
                 for st, size, d in zip((t.stride(0), t.stride(2), t.stride(3)), (n, h, w), dense))


def _nhwc_rows(t: torch.Tensor) -> bool:
    """t is NHWC (unit channel stride) with 16-byte aligned base and pixel, row and image
    strides: what a 4-D tensor descriptor reads."""
    return ((t.stride(1) == 1 or t.shape[1] == 1) and t.data_ptr() % 16 == 0
            and all(st > 0 and st * t.element_size() % 16 == 0 for st in _nhwc_strides(t)))


def _wgrad_tma_reason(g: ConvGeom, x: torch.Tensor, dy: torch.Tensor) -> str | None:
    """Why the TMA wgrad kernel cannot serve this call, or None when it can."""
    if not (WGRAD_TMA and _gemm.DEVICE_TMA):
        return "turned off (AITER_DIST_CONV_WGRAD_TMA=0 or AITER_DIST_DEVICE_TMA=0)"
    if not (INTERPRETED or _device_facts(x.device)[0]):
        return "not a Hopper GPU"
    if g.groups != 1 or x.dtype not in (torch.bfloat16, torch.float16):
        return "grouped or not 16-bit"
    if not (_nhwc_rows(x) and _nhwc_rows(dy)):
        return "x or dy not NHWC with channels a multiple of 8 and 16-byte aligned"
    return None


def _wgrad_tma_geometry(g: ConvGeom, x, dy, block_k: int):
    """What the TMA wgrad kernel sees: ((N, H, W, OH, OW), x's (image, row, pixel) strides,
    dy's, (BOX_H, BOX_W)). A pointwise conv over dense NHWC tensors is seen as one image of one
    row of N*H*W pixels, so its boxes waste nothing."""
    if (g.KH == g.KW == 1 and g.stride == (1, 1) and g.padding == (0, 0, 0, 0)
            and x.is_contiguous(memory_format=torch.channels_last)
            and dy.is_contiguous(memory_format=torch.channels_last)):
        P = g.N * g.H * g.W
        return ((1, 1, P, 1, P), (P * g.C_in, P * g.C_in, g.C_in),
                (P * g.C_out, P * g.C_out, g.C_out), (1, block_k))
    return ((g.N, g.H, g.W, g.OH, g.OW), _nhwc_strides(x), _nhwc_strides(dy),
            wgrad_box(g.OH, g.OW, block_k))


def conv2d_wgrad(dy, x, weight, stride, padding, dilation, groups, need_db=False,
                 backend="triton", *, config=None):
    """(dweight, dbias or None) of ``conv2d``: dweight in weight's dtype and memory format
    (``weight`` gives the shape; its values are not read), dbias (C_out,). Split programs
    write fp32 partials that are summed in a fixed order: deterministic. Recorded as
    ``last_path("conv2d_wgrad")``."""
    op = "conv2d_wgrad"
    reason = _vendor_reason(x)
    if backend == "vendor" or reason is not None:
        record_path(op, "torch.convolution_backward", reason)
        _, dw, db = _vendor_bwd(dy, x, weight, stride, padding, dilation, groups, False, True,
                                need_db)
        return dw, db
    g = conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    cfg = config or _config("wgrad", wgrad_config, g, x.dtype, x.device)
    dy, x = _nhwc(dy), _nhwc(x)
    P = g.N * g.OH * g.OW
    tma_reason = "depthwise" if g.depthwise else _wgrad_tma_reason(g, x, dy)
    if cfg.tma and tma_reason is not None:
        raise ValueError(f"aiter_dist.{op}: ConvConfig(tma=True), but the TMA kernel cannot "
                         f"serve this call: {tma_reason}; pass tma=None or False")
    if tma_reason is None and cfg.tma is not False:
        # The split unit is a box of output pixels.
        tma_geo, x_str, dy_str, box = _wgrad_tma_geometry(g, x, dy, cfg.block_k)
        P = tma_geo[0] * cdiv(tma_geo[3], box[0]) * cdiv(tma_geo[4], box[1])
        per_split = cdiv(P, cfg.split)
    else:
        tma_geo = None
        per_split = cdiv(cdiv(P, cfg.split), cfg.block_k if not g.depthwise else cfg.block_m)
        per_split *= cfg.block_k if not g.depthwise else cfg.block_m
    split = cdiv(P, per_split)
    dw = _like_weight(weight)
    # One split: the kernel stores the weight gradient itself when dweight's memory is the
    # (C_out, KH, KW, C_in/groups) layout it writes (a channels_last weight).
    direct = split == 1 and dw.permute(0, 2, 3, 1).is_contiguous()
    part = (dw.permute(0, 2, 3, 1) if direct else
            torch.empty((split, g.C_out, g.KH, g.KW, g.ci), dtype=torch.float32, device=x.device))
    db_part = (torch.empty((split, g.C_out), dtype=torch.float32, device=x.device)
               if need_db else part)
    geo = (g.stride[0], g.stride[1], g.padding[0], g.padding[2], g.dilation[0], g.dilation[1])
    if tma_geo is not None:
        ensure_scratch_allocator()   # the kernel makes its descriptors in a global scratch
        grid = (cdiv(g.co, cfg.block_m) * g.KH * g.KW * cdiv(g.ci, cfg.block_n), split)
        launch(_conv2d_wgrad_tma_kernel, grid, x.device, x, dy, part, db_part, *tma_geo, g.ci,
               g.co, g.KH, g.KW, *x_str, *dy_str, *geo, per_split, HAS_DB=need_db,
               PRECISION=PRECISION, UPCAST=INTERPRETED, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, BOX_H=box[0], BOX_W=box[1], GROUP_M=cfg.group_m,
               num_warps=cfg.warps, num_stages=cfg.stages)
        path = _PATH + "-tma"
    elif g.depthwise:
        launch(_dw_conv2d_wgrad_kernel, (cdiv(g.C_out, cfg.block_n), g.KH * g.KW, split),
               x.device, x, dy, part, db_part, P, per_split, g.H, g.W, g.OH, g.OW, g.C_out,
               g.co, g.KH, g.KW, *x.stride(), *dy.stride(), *geo, HAS_DB=need_db,
               BLOCK_P=cfg.block_m, BLOCK_C=cfg.block_n, num_warps=cfg.warps)
        path = _PATH + "-depthwise"
    else:
        flat = g.ci < 16
        cols = cdiv(g.KH * g.KW * g.ci, cfg.block_n) if flat else g.KH * g.KW * cdiv(
            g.ci, cfg.block_n)
        grid = (cdiv(g.co, cfg.block_m) * cols, g.groups, split)
        launch(_conv2d_wgrad_kernel, grid, x.device, x, dy, part, db_part, P, per_split, g.H,
               g.W, g.OH, g.OW, g.ci, g.co, g.C_out, g.KH, g.KW, *x.stride(), *dy.stride(),
               *geo, HAS_DB=need_db, FLAT_N=flat, X_C1=x.stride(1) == 1,
               DY_C1=dy.stride(1) == 1,
               PRECISION=PRECISION, UPCAST=INTERPRETED, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
               num_warps=cfg.warps, num_stages=cfg.stages)
        path = _PATH
    if not direct:
        total = part.numel() // split
        block = 1024 if INTERPRETED else max(16, min(256, next_pow2(cdiv(total, 256))))
        launch(_sum_partials_kernel, (cdiv(total, block),), x.device, part, dw, total, split,
               g.KH, g.KW, g.ci, *dw.stride(), BLOCK_S=min(64, next_pow2(split)), BLOCK=block)
    db = None
    if need_db:
        db = (db_part[0] if split == 1 else db_part.sum(0)).to(weight.dtype)
    record_path(op, path)
    return dw, db


def conv2d_bwd(dy, x, weight, stride, padding, dilation, groups, need_dx=True, need_dw=True,
               need_db=False, backends=("triton", "triton", "triton")):
    """(dx, dweight, dbias) of ``conv2d``, None for each one not asked for. ``backends``: who
    serves (forward, dgrad, wgrad); the forward entry is unused here."""
    dx = dw = db = None
    if need_dx:
        dx = conv2d_dgrad(dy, x, weight, stride, padding, dilation, groups, backends[1])
    if need_dw:
        dw, db = conv2d_wgrad(dy, x, weight, stride, padding, dilation, groups, need_db,
                              backends[2])
    elif need_db:
        # A frozen weight with a trained bias: the bias gradient alone is a plain sum.
        db = dy.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- autograd

class Conv2dFunction(torch.autograd.Function):
    """``conv2d`` with normalized parameters; the backward runs dgrad and wgrad (+ dbias) for
    the inputs that need them."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, backends):
        y = conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, backends[0])
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, dilation, groups)
        ctx.backends, ctx.has_bias = backends, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = conv2d_bwd(dy, x, weight, *ctx.args, need[0], need[1],
                                ctx.has_bias and need[2], ctx.backends)
        return dx, dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::conv2d_fwd", mutates_args=())
def _conv2d_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   backends: str) -> torch.Tensor:
    # padding: (top, bottom, left, right); backends: forward, dgrad, wgrad joined by commas.
    return conv2d_fwd(x, weight, bias, stride, padding, dilation, groups,
                      backends.split(",")[0])


@_conv2d_fwd_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, backends):
    g = conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    return torch.empty((g.N, g.C_out, g.OH, g.OW), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


@torch.library.custom_op("aiter_dist::conv2d_bwd", mutates_args=())
def _conv2d_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int, backends: str,
                   need_dx: bool, need_dw: bool,
                   need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); an empty tensor for each one not needed."""
    dx, dw, db = conv2d_bwd(dy, x, weight, stride, padding, dilation, groups, need_dx, need_dw,
                            need_db, backends.split(","))
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


@_conv2d_bwd_op.register_fake
def _(dy, x, weight, stride, padding, dilation, groups, backends, need_dx, need_dw, need_db):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
            if need_dx else x.new_empty(0),
            _like_weight(weight) if need_dw else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_db else x.new_empty(0))


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, backends = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, groups, backends)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_db = ctx.has_bias and need[2]
    dx, dw, db = torch.ops.aiter_dist.conv2d_bwd(dy, x, weight, *ctx.args, need[0], need[1],
                                                 need_db)
    return (dx if need[0] else None, dw if need[1] else None, db if need_db else None,
            None, None, None, None, None)


torch.library.register_autograd("aiter_dist::conv2d_fwd", _conv2d_backward,
                                setup_context=_conv2d_setup)


# ----------------------------------------------------------------------------- functional API

def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution with ``F.conv2d`` semantics, forward and both gradients in Triton.

    Args:
        input: (N, C_in, H, W), float32, float16, bfloat16 (or float64, served by PyTorch).
            channels_last memory is the fast layout; contiguous NCHW (and any other strides)
            works too.
        weight: (C_out, C_in / groups, KH, KW), input's dtype and device, any layout
            (channels_last, i.e. (C_out, KH, KW, C_in/groups) in memory, is read directly).
        bias: (C_out,) in input's dtype, or None.
        stride, dilation: int or (h, w) pair, >= 1.
        padding: int or (h, w) pair of zero padding on both sides, or ``"valid"`` (none) or
            ``"same"`` (output size = input size; stride 1 only; an odd total puts the extra
            row/column at the bottom/right, as F.conv2d).
        groups: splits the channels into ``groups`` independent convolutions; must divide C_in
            and C_out. ``groups == C_in`` (depthwise, any channel multiplier) runs direct
            kernels.

    Returns:
        (N, C_out, OH, OW) in input's dtype and memory format (channels_last in, channels_last
        out, as cuDNN), OH = (H + pad_top + pad_bottom - dil*(KH-1) - 1) // stride + 1.

    Autograd: input, weight and bias gradients (dgrad, wgrad + dbias kernels); dweight keeps
    weight's memory format, dx input's. Accumulation is fp32; dweight and dbias are sums of
    per-program fp32 partials in a fixed order (deterministic).

    Paths: ``last_path("conv2d")``, ``"conv2d_dgrad"``, ``"conv2d_wgrad"``: ``"triton"``
    (``"-depthwise"`` for the direct kernels; ``"triton-interpreter"`` without a GPU) or the
    vendor's (``torch.conv2d``, ``torch.convolution_backward``), chosen by ``default_backend``
    of this module (env ``AITER_DIST_CONV_BACKEND``). float64 and empty inputs take the vendor
    path, recorded with the reason.
    """
    op = "conv2d"
    if compiling():  # (traced code keeps no host caches: the custom op, below)
        key = known = None
    else:
        try:  # inputs and parameters seen before passed the checks (the config tables and the
            # module's switches are part of the key; a table changed in place needs clear_plans())
            key = (*signature(input), *signature(weight),
                   None if bias is None else signature(bias), stride, padding, dilation, groups,
                   default_backend, id(TUNED), id(TUNED_CONFIGS), id(_configs), PRECISION,
                   GEMM_1X1, GPU_NHWC_COPY, plan_device(input.device))
            known = _conv_plans.get(key)
        except (AttributeError, TypeError):  # not tensors, or parameters given as lists
            key = known = None
    if known is not None:
        (stride, padding, dilation), backends, plan = known
        if plan is not None and not (
                (input.requires_grad or weight.requires_grad
                 or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled()) and (
                not (input.data_ptr() | weight.data_ptr()
                     | (0 if bias is None else bias.data_ptr())) & 15):
            y_shape, y_format, ints = plan.extra
            y = torch.empty(y_shape, dtype=input.dtype, device=input.device,
                            memory_format=y_format)
            plan(input, weight, y if bias is None else bias, y, *ints)
            record_path(op, _PATH)
            return y
    else:
        stride, padding, dilation = conv_params(op, input, weight, bias, stride, padding,
                                                dilation, groups)
        backends = conv_backends(input, weight, stride, padding, dilation, groups)
        if key is not None:
            known = _conv_plans[key] = [(stride, padding, dilation), backends, None]
    if compiling():
        return torch.ops.aiter_dist.conv2d_fwd(input, weight, bias, list(stride), list(padding),
                                               list(dilation), groups, ",".join(backends))
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups,
                                    backends)
    return conv2d_fwd(input, weight, bias, stride, padding, dilation, groups, backends[0],
                      keep=known)


# (input, weight, bias signatures, the parameters as given, backend, config tables, switches,
# current device) -> [normalized parameters, backends, LaunchPlan of the direct forward kernel or
# None].
_conv_plans = plan_cache()



__all__ = ["conv2d", "conv2d_ref", "conv2d_fwd", "conv2d_dgrad", "conv2d_wgrad", "conv2d_bwd",
           "Conv2dFunction", "ConvConfig", "ConvGeom", "conv_params", "conv_geometry",
           "conv_backends", "conv_key", "fwd_config", "dgrad_config", "wgrad_config",
           "memory_format", "TUNED", "TUNED_CONFIGS", "default_backend"]
