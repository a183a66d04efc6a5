"""Flash attention, forward and backward: causal, sliding window, GQA/MQA, variable length.

Layouts follow flash-attention: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k,
nheads_k, headdim); varlen q (total_q, nheads, headdim) with int32 ``cu_seqlens``. A query row i
may see key j when ``i + (sk - sq) - left <= j <= i + (sk - sq) + right`` (``window_size=(left,
right)``, -1 unbounded; causal is right = 0), so masks align to the bottom-right. Rows that see no
key output 0 and carry lse = +inf (their gradient is 0).

Forward: one program per (query block, batch x head), online softmax in base 2, fp32 statistics.
Every loop over blocks runs in three ranges: boundary blocks before and after, where keys may be
out of range or outside the causal/sliding window and the scores are masked, and the interior,
where no mask is computed or applied (``_key_blocks``).
Backward: ``delta = rowsum(dO * O)`` (a small kernel: one read of each), then one kernel per key
block and KV head that loops over the query blocks of every query head in its GQA group: it sums
dK and dV in registers and adds each tile's share of dQ into an fp32 buffer with atomics. With
``deterministic=True`` dQ comes from a second kernel, one per query block, instead (no atomics,
fixed order, P recomputed). A config may split a GQA group over several programs per key
block (``Blocks.split_group``): each writes fp32 partial dK/dV, summed in split order.
Memory stays linear in sequence length.

This file: the launchers, the autograd Function, the torch.library ops and the public functions;
the reference and the jit kernels are in ``flash_attn_kernels.py``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch

from ._runtime import (INTERPRETED, cdiv, check_same_device, compiling, launch, next_pow2,
                       plan_cache, plan_device, plan_launch, record_path, runs_triton, signature)
from .flash_attn_kernels import (  # noqa: F401  (attention_ref: part of this module's API)
    LOG2E, _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel,
    attention_ref)


# ----------------------------------------------------------------------------- launchers

class Blocks(NamedTuple):
    """One kernel's launch config; plain tuples of 4 to 7 items are accepted too."""
    block_m: int   # query rows per program (forward, dQ) or per step (dK/dV)
    block_n: int   # keys per step (forward, dQ) or per program (dK/dV)
    warps: int
    stages: int
    tma: bool = False     # the looped-over tiles come through tensor descriptors (Hopper)
    tma_dq: bool = False  # one-kernel backward: the copy engine adds dQ (compiled runs only)
    split_group: int = 1  # dK/dV: programs sharing a GQA group (fp32 partials, summed in order)


def _cpu_blocks(sq: int, sk: int) -> Blocks:
    # The interpreter pays per program and per op, not per element: whole short sequences per
    # block (few programs, few loop trips), capped so one block's numpy arrays stay small.
    return Blocks(min(128, max(16, next_pow2(sq))),
                  min(128, max(16, next_pow2(sk))), 1, 1)


def _fwd_blocks(d: int, device: torch.device, sq: int = 0, sk: int = 0) -> Blocks:
    """The forward's config."""
    if device.type == "cpu":
        return _cpu_blocks(sq, sk)
    # H200 sweep (bench_attention.py --sweep, b4 s4096, bf16, TFLOP/s causal/full): K and V
    # through TMA with 64x64 tiles, 4 warps, 3 stages won at hd128 (472/522; pointers 398/416;
    # 128x64 with 8 warps 409/455; 4 stages 340/380, as 148 KB of smem leave one program per
    # SM) and hd64 (391/440; 128x64 pointers 372/426). Head dims that are not a power of 2 take
    # the pointer path with the same tiles.
    if d <= 128:
        return Blocks(64, 64, 4, 3, True)
    return Blocks(64, 32, 4, 2)


# Problems of at most this many scores (batch * heads * seqlen_q * seqlen_k) take the default
# configs without TMA: Triton's launcher expands tensor-descriptor arguments in Python and
# encodes them on every launch (~10 us a launch on the H200 hosts, more than such a kernel runs).
# H200, causal forward, bf16, graph replay: 131K scores (b1 s128 h8 d64) 4.1 us with pointers
# against 4.8 with TMA; 1M (b1 s256 h16 d128) 7.9 against 7.0, so the bound stays below 1M.
HOST_BOUND_SCORES = 1 << 18


def _host_bound(heads: int, sq: int, sk: int) -> bool:
    return heads * sq * sk <= HOST_BOUND_SCORES


def _bwd_blocks(d: int, device: torch.device, sq: int = 0, sk: int = 0,
                deterministic: bool = False, group: int = 1, causal: bool = True):
    """The backward's config: Blocks for the one-kernel backward (or for both kernels of the
    deterministic one), or a (dK/dV, dQ) pair, which picks the two-kernel backward."""
    if device.type == "cpu":
        return _cpu_blocks(sq, sk)
    if d > 128:
        return Blocks(32, 32, 4, 1)
    # H200 sweep (same shapes, TFLOP/s causal/full). hd128: the one kernel with 128 keys per
    # program, 8 warps, 3 stages and dQ added by the copy engine 336/380 (pointer atomics
    # 321/373; 64 keys per program 216/236); the two kernels at 64x64, 4 warps 306/410. The
    # full table agreed at every length (one kernel ahead causal, 1.07-1.16x; behind full,
    # 0.95-0.97x). With GQA (32/8 heads, causal) the one kernel loops over the group with 4x
    # fewer programs: 283 against 331. hd64: two kernels with dQ's K and V through TMA 275/358
    # (one kernel at best 281/299). The one kernel with the group split over programs
    # (Blocks.split_group, ``bench_attention.py --gqa-split``, GQA 32/8 causal): 292 with 2
    # programs per group, 282 with 4, against 286 looped and 339 for the two kernels.
    if d <= 64:
        return (Blocks(64, 64, 4, 2), Blocks(64, 64, 4, 3, True))
    if deterministic or group > 1 or not causal:
        return (Blocks(64, 64, 4, 2), Blocks(64, 64, 4, 2))
    return Blocks(64, 128, 8, 3, False, True)


def _check(op, q, k, v, varlen):
    names = (("q", q), ("k", k), ("v", v))
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"aiter_dist.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        want = 3 if varlen else 4
        if t.dim() != want:
            layout = "(total, nheads, headdim)" if varlen else "(batch, seqlen, nheads, headdim)"
            raise ValueError(f"aiter_dist.{op}: {name} must be {want}-D {layout}, got shape "
                             f"{tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"aiter_dist.{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    check_same_device(op, q=q, k=k, v=v)
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed:
        raise TypeError(f"aiter_dist.{op}: dtype {q.dtype} is not supported; use float16 or "
                        f"bfloat16 (or float32)")
    if q.device.type == "cpu" and INTERPRETED and q.dtype == torch.bfloat16:
        raise TypeError(f"aiter_dist.{op}: bfloat16 is not supported on CPU (Triton's interpreter "
                        f"cannot multiply bf16 matrices); use float32 or float16 on CPU")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"aiter_dist.{op}: head dims differ: q {d}, k {k.shape[-1]}, "
                         f"v {v.shape[-1]}")
    if d > 256 or d % 8:
        raise ValueError(f"aiter_dist.{op}: head dim {d} is not supported; use a multiple of 8 "
                         f"up to 256")
    h, hk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hk:
        raise ValueError(f"aiter_dist.{op}: k has {hk} heads but v has {v.shape[-2]}")
    if hk == 0 or h % hk:
        raise ValueError(f"aiter_dist.{op}: nheads={h} must be a multiple of nheads_k={hk}")
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"aiter_dist.{op}: k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"aiter_dist.{op}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")


def _tiles(wanted: bool, rows: int, varlen: bool, *tensors):
    """``(use_tma, args)``: tensor descriptors of ``tensors`` (batch, seq, head, dim) with
    ``rows``-row tiles when wanted and the layout allows (dense, not empty, head dim a power of
    2 from 16 on, 16-byte aligned base and strides), else the tensors."""
    d = tensors[0].shape[-1]
    if wanted and not varlen and d == _block_d(d) and all(
            t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors):
        from triton.tools.tensor_descriptor import TensorDescriptor

        return True, [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, d])
                      for t in tensors]
    return False, list(tensors)


def _block_d(d: int) -> int:
    """Head-dim tile: a power of 2, at least 16 (a matrix product needs K >= 16 on the GPU;
    head dim 8 is padded with masked columns)."""
    return max(16, next_pow2(d))


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t, varlen):
    """(batch, seq, head) strides in elements; a varlen tensor has batch stride 0."""
    return (0,) + tuple(t.stride()[:2]) if varlen else tuple(t.stride()[:3])


def _window(causal, window_size):
    left, right = window_size
    if causal:
        right = 0
    return left, right


def _precision(dtype):
    # fp32 inputs are multiplied in full fp32 (a reference-grade path); 16-bit ones in tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attn_fwd(q, k, v, softmax_scale, causal, window_size, cu_seqlens_q=None,
                   cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *, config=None,
                   sig=None):
    """Forward launcher: (out, lse). Dense lse is (batch, nheads, seqlen_q); varlen (nheads,
    total_q). ``sig``: q, k and v's signatures (shape, strides, dtype, device), when the caller
    has them."""
    varlen = cu_seqlens_q is not None
    plan_key = None
    if not varlen and config is None:
        plan_key, plan = _fwd_plan_key(q, k, v, causal, window_size, sig)
        if plan is not None and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            return _planned_fwd(plan, q, k, v, softmax_scale)
        if plan_key is not None and not all(t.stride(-1) == 1 for t in (q, k, v)):
            plan_key = None  # (copies below: a plan launches the tensors as given)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    d = q.shape[-1]
    h, hk = q.shape[-2], k.shape[-2]
    left, right = _window(causal, window_size)
    out = torch.empty_like(q)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        sq, sk = max_seqlen_q, max_seqlen_k
        lse = torch.empty(h, q.shape[0], dtype=torch.float32, device=q.device)
        lse_strides = (0, lse.stride(0))
    else:
        batch, sq = q.shape[:2]
        sk = k.shape[1]
        lse = torch.empty(batch, h, sq, dtype=torch.float32, device=q.device)
        lse_strides = lse.stride()[:2]
    if not runs_triton("flash_attn", q.device):
        return _torch_fwd(q, k, v, softmax_scale, left, right, cu_seqlens_q, cu_seqlens_k,
                          out, lse)
    # TMA (tensor descriptors for K and V) serves dense layouts whose head dim is a power of 2.
    if config is None:
        config = _fwd_blocks(d, q.device, sq, sk)
        if _host_bound(batch * h, sq, sk):
            config = config._replace(tma=False)
    config = Blocks(*config)
    block_m, block_n, warps, stages = config[:4]
    block_d = _block_d(d)
    grid = (cdiv(max(sq, 1), block_m), batch * h)
    cu_q = cu_seqlens_q if varlen else lse  # unused placeholders when dense
    cu_k = cu_seqlens_k if varlen else lse
    use_tma, (kk, vv) = _tiles(config.tma, block_n, varlen, k, v)
    path = ("triton-interpreter" if INTERPRETED else "triton") + ("-tma" if use_tma else "")
    if batch * h > 0 and sq > 0:
        ints = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                *_strides(out, varlen), *lse_strides, sq, sk, h, h // hk)
        window = (max(left, 0), max(right, 0))
        plan = (plan_launch if plan_key is not None else launch)(
            _attn_fwd_kernel, grid, q.device, q, kk, vv, out, lse, cu_q, cu_k, *ints,
            softmax_scale * LOG2E, *window,
            IS_VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HEAD_DIM=d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PRECISION=_precision(q.dtype), USE_TMA=use_tma, num_warps=warps, num_stages=stages)
        if plan_key is not None and plan is not None:
            # (descriptor templates without their tensors: a plan keeps no memory alive)
            descs = (_rebased(kk, None), _rebased(vv, None)) if use_tma else None
            plan.extra = (tuple(lse.shape), descs, ints, window, path)
            _fwd_plans[plan_key] = plan
    record_path("flash_attn", path)
    return out, lse


# (q, k, v signatures, causal, window, current device) -> LaunchPlan of the dense forward; extra
# is (lse shape, K and V descriptors to copy or None, ints before the scale, ints after, path).
_fwd_plans = plan_cache()


def _fwd_plan_key(q, k, v, causal, window_size, sig=None):
    try:
        key = (*(sig or (*signature(q), *signature(k), *signature(v))), bool(causal),
               tuple(window_size), plan_device(q.device))
        return key, _fwd_plans.get(key)
    except (AttributeError, TypeError):  # not tensors, or window_size not a pair of ints
        return None, None


def _planned_fwd(plan, q, k, v, softmax_scale):
    """The dense forward from a plan: outputs, descriptors rebased on k and v, one launch."""
    lse_shape, descs, ints, window, path = plan.extra
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if descs is not None:
        k, v = _rebased(descs[0], k), _rebased(descs[1], v)
    plan(q, k, v, out, lse, lse, lse, *ints, softmax_scale * LOG2E, *window)
    record_path("flash_attn", path)
    return out, lse


def _rebased(desc, t):
    """A copy of tensor descriptor ``desc`` over ``t`` (same shape, strides, dtype, alignment):
    the dataclass's checks ran when ``desc`` was built."""
    copy = object.__new__(type(desc))
    copy.__dict__.update(desc.__dict__)
    copy.base = t
    return copy



def flash_attn_bwd(do, q, k, v, out, lse, softmax_scale, causal, window_size, cu_seqlens_q=None,
                   cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                   deterministic=False, config=None):
    """Backward launcher: (dq, dk, dv).

    Default: one kernel per key block computes dK, dV and adds its share of dQ into an fp32
    buffer with atomics (five matrix products per tile; the adds land in no fixed order, so dQ
    may differ in its last bits between runs). ``deterministic=True``: dK/dV and dQ in two
    kernels with fixed reduction orders (seven products per tile), bitwise reproducible.
    """
    varlen = cu_seqlens_q is not None
    plan_key = None
    if not varlen and config is None:
        try:
            plan_key = (*signature(do), *signature(q), *signature(k), *signature(v),
                        *signature(out), *signature(lse), float(softmax_scale), bool(causal),
                        tuple(window_size), bool(deterministic), plan_device(q.device))
            plans = _bwd_plans.get(plan_key)
        except (AttributeError, TypeError):  # not tensors: the full path names the problem
            plan_key = plans = None
        if plans is not None and not (do.data_ptr() | q.data_ptr() | k.data_ptr() | v.data_ptr()
                                      | out.data_ptr() | lse.data_ptr()) & 15:
            return _planned_bwd(plans, do, q, k, v, out, lse)
        if plan_key is not None and not all(t.stride(-1) == 1 for t in (do, q, k, v, out)):
            plan_key = None  # (copies below: a plan launches the tensors as given)

    def go(*args, **kwargs):  # launch, and return its plan when this call makes plans
        if plan_key is None:
            launch(*args, **kwargs)
            return None
        return plan_launch(*args, **kwargs)

    do = _last_dim_contiguous(do)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    d = q.shape[-1]
    h, hk = q.shape[-2], k.shape[-2]
    left, right = _window(causal, window_size)
    if not runs_triton("flash_attn_bwd", q.device):
        return _torch_bwd(do, q, k, v, softmax_scale, left, right, cu_seqlens_q, cu_seqlens_k)
    out = _last_dim_contiguous(out)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)  # rowsum(dO * O), laid out like lse
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        sq, sk = max_seqlen_q, max_seqlen_k
        lse_strides = (0, lse.stride(0))
    else:
        batch, sq = q.shape[:2]
        sk = k.shape[1]
        lse_strides = lse.stride()[:2]
    # config: Blocks for the one kernel (or for both kernels when deterministic), or a (dK/dV,
    # dQ) pair, which takes the two-kernel path either way (where the tuning found it faster).
    # TMA: the tiles each kernel loops over (Q, dO for dK/dV; K, V for dQ) come through tensor
    # descriptors. Triton 3.6's ptxas crashes on the dQ kernel with descriptors and 2 stages
    # (1 and 3 compile).
    if config is None:
        config = _bwd_blocks(d, q.device, sq, sk, deterministic, h // hk, right >= 0)
        if _host_bound(batch * h, sq, sk):
            config = (config._replace(tma=False, tma_dq=False) if isinstance(config, Blocks)
                      else tuple(Blocks(*c)._replace(tma=False, tma_dq=False) for c in config))
    if isinstance(config[0], int):
        cfg_kv = cfg_q = Blocks(*config)
    else:
        cfg_kv, cfg_q = (Blocks(*c) for c in config)
        deterministic = True
    if cfg_kv.tma or cfg_kv.tma_dq or cfg_q.tma or cfg_kv.split_group > 1:
        # Descriptor and split-group launches are not planned (their GPU time hides the host's):
        # no plan to make, so no second launch key per launch either.
        plan_key = None
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    plan_delta = plan_kv = plan_q = None
    if batch * h > 0 and sq > 0:
        # 64 rows of any head dim keep the tile in registers (4 warps); the interpreter likes
        # whole short sequences.
        delta_rows = cfg_q.block_m if q.device.type == "cpu" else 64
        ints = (*_strides(out, varlen), *_strides(do, varlen), *lse_strides, sq, h)
        plan_delta = go(_attn_bwd_delta_kernel, (cdiv(sq, delta_rows), batch * h), q.device,
                        out, do, delta, cu_q, *ints, IS_VARLEN=varlen, HEAD_DIM=d,
                        BLOCK_M=delta_rows, BLOCK_D=_block_d(d), num_warps=4)
        if plan_delta is not None:
            plan_delta.extra = ints
    common = dict(IS_VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HEAD_DIM=d,
                  BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype))

    def blocks(cfg):
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.warps,
                    num_stages=cfg.stages)

    scales = (softmax_scale * LOG2E, softmax_scale, max(left, 0), max(right, 0))
    # dQ: summed by atomics into fp32 (zeros where no key is seen), or written once per row.
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32,
                                                               device=q.device)
    engine = "triton-interpreter" if INTERPRETED else "triton"
    use_tma = dq_tma = False
    split = 1
    if batch * hk > 0 and sk > 0:
        use_tma, (qq, dd) = _tiles(cfg_kv.tma, cfg_kv.block_m, varlen, q, do)
        # The interpreter has no bulk reduce: CPU runs keep the pointer atomics.
        dq_tma, (dq_arg,) = _tiles(cfg_kv.tma_dq and not deterministic and not INTERPRETED,
                                   cfg_kv.block_m, varlen, dq)
        # GQA: split the group over programs (fp32 partials of dK and dV, summed below).
        if cfg_kv.split_group < 1:
            raise ValueError(f"aiter_dist.flash_attn_bwd: config split_group must be >= 1, got "
                             f"{cfg_kv.split_group}")
        split = cfg_kv.split_group if (h // hk) % cfg_kv.split_group == 0 else 1
        dk_out, dv_out = dk, dv
        if split > 1:
            dk_out = torch.empty((split,) + k.shape, dtype=torch.float32, device=k.device)
            dv_out = torch.empty((split,) + v.shape, dtype=torch.float32, device=v.device)
        ints = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                *_strides(do, varlen), *_strides(dk_out[0] if split > 1 else dk, varlen),
                *_strides(dv_out[0] if split > 1 else dv, varlen),
                *_strides(dq, varlen), *lse_strides, sq, sk, hk, h // hk, *scales, split,
                dk_out.stride(0) if split > 1 else 0, dv_out.stride(0) if split > 1 else 0)
        plan_kv = go(_attn_bwd_dkdv_kernel, (cdiv(sk, cfg_kv.block_n), batch * hk * split),
                     q.device, qq, k, v, dd, lse, delta, dk_out, dv_out, dq_arg, cu_q, cu_k,
                     *ints, USE_TMA=use_tma, ATOMIC_DQ=not deterministic, DQ_TMA=dq_tma,
                     **common, **blocks(cfg_kv))
        if plan_kv is not None:
            plan_kv.extra = ints
        if split > 1:   # the partials added in split order: deterministic
            for out, parts in ((dk, dk_out), (dv, dv_out)):
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
                out.copy_(total)
    if not deterministic:
        path = (engine + "-atomic-dq" + ("-tma" if use_tma else "") + ("-bulk" if dq_tma else "")
                + (f"-split{split}" if split > 1 else ""))
        if plan_delta and plan_kv:
            _bwd_plans[plan_key] = (False, plan_delta, plan_kv, None, path)
        record_path("flash_attn_bwd", path)
        return dq.to(q.dtype), dk, dv
    if batch * h > 0 and sq > 0:
        use_tma, (kk, vv) = _tiles(cfg_q.tma, cfg_q.block_n, varlen, k, v)
        ints = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                *_strides(do, varlen), *_strides(dq, varlen), *lse_strides,
                sq, sk, h, h // hk, *scales)
        plan_q = go(_attn_bwd_dq_kernel, (cdiv(sq, cfg_q.block_m), batch * h), q.device,
                    q, kk, vv, do, lse, delta, dq, cu_q, cu_k, *ints, USE_TMA=use_tma,
                    **common, **blocks(cfg_q))
        if plan_q is not None:
            plan_q.extra = ints
        if plan_delta and plan_kv and plan_q:
            _bwd_plans[plan_key] = (True, plan_delta, plan_kv, plan_q,
                                    engine + "-deterministic")
    record_path("flash_attn_bwd", engine + "-deterministic" + ("-tma" if use_tma else "")
                + (f"-split{split}" if split > 1 else ""))
    return dq, dk, dv


# (do, q, k, v, out, lse signatures, scale, causal, window, deterministic, current device) ->
# (deterministic, LaunchPlans of the delta, dK/dV and dQ kernels, path) of a dense backward
# whose tiles come through pointers, its group not split: the host-bound problems (larger ones
# take the descriptor paths, whose GPU time hides the host's).
_bwd_plans = plan_cache()


def _planned_bwd(plans, do, q, k, v, out, lse):
    """The dense backward from its plans: the outputs, two or three launches. (The dense
    kernels take lse as the unused sequence-offset pointers.)"""
    deterministic, plan_delta, plan_kv, plan_q, path = plans
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    plan_delta(out, do, delta, lse, *plan_delta.extra)
    if deterministic:
        dq = torch.empty_like(q)
        plan_kv(q, k, v, do, lse, delta, dk, dv, dq, lse, lse, *plan_kv.extra)
        plan_q(q, k, v, do, lse, delta, dq, lse, lse, *plan_q.extra)
        record_path("flash_attn_bwd", path)
        return dq, dk, dv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    plan_kv(q, k, v, do, lse, delta, dk, dv, dq, lse, lse, *plan_kv.extra)
    record_path("flash_attn_bwd", path)
    return dq.to(q.dtype), dk, dv


def _split_varlen(t, cu):
    bounds = cu.tolist()
    return [t[bounds[i]:bounds[i + 1]].unsqueeze(0) for i in range(len(bounds) - 1)]


def _torch_fwd(q, k, v, scale, left, right, cu_q, cu_k, out, lse):
    """PyTorch path for CPU tensors on GPU machines (quadratic memory; recorded as a fallback)."""
    if cu_q is None:
        o, l = attention_ref(q.float(), k.float(), v.float(), scale, False, (left, right))
        out.copy_(o)
        lse.copy_(l)
        return out, lse
    for i, (qs, ks, vs) in enumerate(zip(_split_varlen(q, cu_q), _split_varlen(k, cu_k),
                                         _split_varlen(v, cu_k))):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        o, l = attention_ref(qs.float(), ks.float(), vs.float(), scale, False, (left, right))
        out[a:b] = o[0]
        lse[:, a:b] = l[0]
    return out, lse


def _torch_bwd(do, q, k, v, scale, left, right, cu_q, cu_k):
    with torch.enable_grad():
        qs, ks, vs = (t.detach().float().requires_grad_() for t in (q, k, v))
        if cu_q is None:
            o, _ = attention_ref(qs, ks, vs, scale, False, (left, right))
        else:
            parts = [attention_ref(a, b, c, scale, False, (left, right))[0][0]
                     for a, b, c in zip(_split_varlen(qs, cu_q), _split_varlen(ks, cu_k),
                                        _split_varlen(vs, cu_k))]
            o = torch.cat(parts)
        dq, dk, dv = torch.autograd.grad(o, (qs, ks, vs), do.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- autograd

class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_size, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, deterministic):
        out, lse = flash_attn_fwd(q, k, v, softmax_scale, causal, window_size, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (softmax_scale, causal, window_size, max_seqlen_q, max_seqlen_k, deterministic)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # (lse has no gradient: no zeros for it)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:  # (only lse was used)
            return (None,) * 11
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        scale, causal, window, max_q, max_k, deterministic = ctx.args
        dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, window, cu_q, cu_k,
                                    max_q, max_k, deterministic=deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                       max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                       window_left: int, window_right: int,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens_q is not None
    if varlen:  # traced code cannot read the offsets: they are checked where the op runs
        _check_offsets_values("flash_attn_varlen_func", q, k, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k)
    return flash_attn_fwd(q, k, v, softmax_scale, causal, (window_left, window_right),
                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q if varlen else None,
                          max_seqlen_k if varlen else None)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, deterministic):
    if cu_seqlens_q is not None:
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("aiter_dist::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                       softmax_scale: float, causal: bool, window_left: int, window_right: int,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens_q is not None
    return flash_attn_bwd(dout, q, k, v, out, lse, softmax_scale, causal,
                          (window_left, window_right), cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q if varlen else None, max_seqlen_k if varlen else None,
                          deterministic=deterministic)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, deterministic):
    # dQ as flash_attn_bwd allocates it: like q (deterministic), else contiguous (from fp32 sums).
    dq = torch.empty_like(q) if deterministic else q.new_empty(q.shape)
    return dq, torch.empty_like(k), torch.empty_like(v)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = args
    ctx.mark_non_differentiable(output[1])


def _flash_attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.aiter_dist.flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k,
                                                     *ctx.args)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd("aiter_dist::flash_attn_fwd", _flash_attn_backward,
                                setup_context=_flash_attn_setup)


def _attention(q, k, v, scale, causal, window_size, cu_q, cu_k, max_q, max_k, deterministic,
               sig=None):
    """(out, lse): through the custom op when compiling, else the autograd Function."""
    if compiling():
        return torch.ops.aiter_dist.flash_attn_fwd(q, k, v, cu_q, cu_k, max_q or 0, max_k or 0,
                                                   scale, bool(causal), int(window_size[0]),
                                                   int(window_size[1]), deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttnFunction.apply(q, k, v, scale, causal, tuple(window_size), cu_q, cu_k,
                                       max_q, max_k, deterministic)
    # Nothing to differentiate: the launcher alone (autograd's Function costs host time).
    return flash_attn_fwd(q, k, v, scale, causal, tuple(window_size), cu_q, cu_k, max_q, max_k,
                          sig=sig)


# ----------------------------------------------------------------------------- functional API

CHECK_VARLEN_ENV = "AITER_DIST_CHECK_VARLEN"
_OFFSETS_FIX = ("build the offsets from the per-sequence lengths as "
                "torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)")
_SYNC_NOTE = (f"on GPU this check costs one device synchronization per call; "
              f"{CHECK_VARLEN_ENV}=0 turns it off")


def _seqlen_arg(op, name, value) -> int:
    """``max_seqlen_*`` as a Python int >= 0 (a one-element tensor is read once)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"aiter_dist.{op}: {name} must be an int (the longest sequence's "
                        f"length), got {value!r}")
    if value < 0:
        raise ValueError(f"aiter_dist.{op}: {name} must be >= 0 (the longest sequence's "
                         f"length), got {value}")
    return int(value)


def _check_offsets_layout(op, q, k, cu_seqlens_q, cu_seqlens_k):
    """dtype, rank, device and count of the offsets: cheap, no look at their values."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"aiter_dist.{op}: {name} must be a 1-D int32 tensor (got {got}); "
                            f"use .to(torch.int32)")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"aiter_dist.{op}: {name} must be a 1-D int32 tensor of batch + 1 "
                             f"offsets starting at 0, got shape {tuple(cu.shape)}; "
                             f"{_OFFSETS_FIX}")
    check_same_device(op, q=q, k=k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"aiter_dist.{op}: cu_seqlens_q has {cu_seqlens_q.numel()} offsets but "
                         f"cu_seqlens_k has {cu_seqlens_k.numel()}; both must hold batch + 1 "
                         f"(one sequence of queries and one of keys per batch entry)")


def _checks_offset_values(device: torch.device) -> bool:
    """Whether the offsets' values are checked: always on CPU (no synchronization to pay); on
    GPU unless AITER_DIST_CHECK_VARLEN=0, or while a CUDA graph is captured (no host reads
    there)."""
    if device.type == "cpu":
        return True
    if os.environ.get(CHECK_VARLEN_ENV, "1") == "0":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _offsets_summary(cu):
    """(first, last, shortest, longest) of offsets ``cu`` as one int64 device tensor. The 0
    appended to the lengths keeps min and max defined for a batch of none."""
    cu = cu.long()
    lens = torch.cat([cu[1:] - cu[:-1], cu.new_zeros(1)])
    return torch.stack([cu[0], cu[-1], lens.min(), lens.max()])


def _offsets_problem(name, offsets, rows, rows_of, max_name, max_seqlen):
    """What is wrong with ``offsets`` (a list) for a packed tensor of ``rows`` rows, and the
    fix; None when nothing is."""
    if offsets[0] != 0:
        return f"{name}[0] is {offsets[0]}; the offsets must start at 0; {_OFFSETS_FIX}"
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            return (f"{name} decreases at index {i} ({offsets[i - 1]} then {offsets[i]}); "
                    f"offsets must be non-decreasing (sequence {i - 1} would have a negative "
                    f"length); {_OFFSETS_FIX}")
    if offsets[-1] != rows:
        return (f"{name}[-1] is {offsets[-1]} but {rows_of} has {rows} rows; the last offset "
                f"must equal the number of packed rows; {_OFFSETS_FIX}")
    lens = [b - a for a, b in zip(offsets, offsets[1:])]
    longest = max(lens, default=0)
    if longest > max_seqlen:
        i = lens.index(longest)
        return (f"sequence {i} has {longest} rows ({name}[{i + 1}] - {name}[{i}]) but "
                f"{max_name} is {max_seqlen}; pass {max_name} >= {longest} (the longest "
                f"sequence)")
    return None


def _check_offsets_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Offsets that start at 0, never decrease, end at the packed tensor's row count, and whose
    longest sequence fits max_seqlen: the kernels trust them for every address they form."""
    if not _checks_offset_values(q.device):
        return
    # Both summaries in one transfer: a single synchronization on GPU.
    summaries = torch.stack([_offsets_summary(cu_seqlens_q),
                             _offsets_summary(cu_seqlens_k)]).tolist()
    args = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", "max_seqlen_q", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k (and v)", "max_seqlen_k",
             max_seqlen_k))
    for (first, last, shortest, longest), (name, cu, rows, rows_of, max_name, max_len) in zip(
            summaries, args):
        if first == 0 and last == rows and shortest >= 0 and longest <= max_len:
            continue
        raise _offsets_error(op, _offsets_problem(name, cu.tolist(), rows, rows_of, max_name,
                                                  max_len), q.device)


def _offsets_error(op, problem, device):
    # Off CPU the check has a cost: say how to drop it.
    note = "" if device.type == "cpu" else f" ({_SYNC_NOTE})"
    return ValueError(f"aiter_dist.{op}: {problem}{note}")


def _common_args(op, dropout_p, softmax_scale, window_size, d):
    if dropout_p:
        raise NotImplementedError(f"aiter_dist.{op}: dropout_p > 0 is not implemented; "
                                  f"pass dropout_p=0.0")
    if len(window_size) != 2 or any(w < -1 for w in window_size):
        raise ValueError(f"aiter_dist.{op}: window_size must be (left, right) with -1 for "
                         f"unbounded, got {window_size}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if not softmax_scale > 0:  # the kernels fold the scale into the row max
        raise ValueError(f"aiter_dist.{op}: softmax_scale must be positive, got {softmax_scale}")
    return float(softmax_scale)


# (q, k, v signatures) that passed flash_attn_func's checks.
_checked_dense = plan_cache()


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), deterministic=False, return_lse=False):
    """Attention over batched sequences of one length: forward and backward in Triton.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim), the same batch as q.
        dropout_p: 0.0 (nothing else is implemented).
        softmax_scale: the factor on q @ k^T; None for ``1 / sqrt(headdim)``.
        causal: mask later keys, bottom-right aligned (below).
        window_size: ``(left, right)`` keys visible on either side of the diagonal, -1 unbounded.
        deterministic: a bitwise reproducible backward (slower).
        return_lse: also return ``lse``.

    Returns:
        ``out`` (batch, seqlen_q, nheads, headdim) in q's dtype; with ``return_lse=True``,
        ``(out, lse)`` with ``lse`` the natural-log logsumexp of each row's scaled scores, float32
        of shape (batch, nheads, seqlen_q).

    Masks. Within each sequence, query row ``i`` (0-based, of ``seqlen_q`` rows) may attend to key
    ``j`` (of ``seqlen_k``) when ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q
    + right``, with ``(left, right) = window_size`` and -1 meaning unbounded on that side; the
    default ``(-1, -1)`` is full attention. ``causal=True`` sets ``right`` to 0 and keeps
    ``left`` (``window_size=(w, 0)`` with ``causal=True`` is a causal sliding window of ``w + 1``
    keys). Both masks are aligned to the bottom-right corner of the score matrix: when
    ``seqlen_q != seqlen_k`` the last query row lines up with the last key (as in decoding with a
    cache), so with ``causal=True`` and ``seqlen_q > seqlen_k`` the first ``seqlen_q - seqlen_k``
    rows see no key at all. A row that sees no key gets ``out`` = 0 and ``lse`` = +inf, and
    passes no gradient (its dq is 0 and it adds nothing to dk, dv); no NaN appears.

    Scores are ``softmax_scale * q @ k^T`` with ``softmax_scale`` defaulting to
    ``1 / sqrt(headdim)`` (it must be positive). ``dropout_p`` must be 0.0: dropout is not
    implemented (``NotImplementedError``). GQA / MQA: ``nheads`` must be a multiple of
    ``nheads_k``; query head ``h`` reads KV head ``h // (nheads // nheads_k)``, and k, v are not
    repeated in memory.

    Dtypes: q, k, v share one dtype and one device: float16 or bfloat16 (tensor-core products),
    or float32 (products in full fp32, no TF32). bfloat16 is refused on CPU, where Triton's
    interpreter cannot multiply it. ``headdim`` is a multiple of 8 up to 256. Any strides are
    accepted (a last dimension that is not contiguous is copied).

    Autograd: q, k and v receive gradients of their own shapes and dtypes; ``lse`` is not
    differentiable. ``deterministic=False`` (the default) sums dq with fp32 atomics in no fixed
    order, so its last bits may change from run to run; ``deterministic=True`` computes dq in a
    second kernel with a fixed order (about 7 matrix products per tile instead of 5) and the
    whole backward is bitwise reproducible.

    Numerics: softmax statistics and accumulation in fp32, ``out`` rounded once to q's dtype.
    Bitwise promises hold on the kernel paths only (``aiter_dist.last_path("flash_attn")`` is
    ``"triton"``, ``"triton-tma"`` or ``"triton-interpreter"``): the same inputs on the same
    device give the same forward bits every run, and with ``deterministic=True`` the same
    gradients. CPU tensors on a GPU machine take a PyTorch path (fp32, quadratic memory,
    recorded as ``"torch"``) with the same masks but no bitwise promise.
    """
    try:  # inputs of a signature seen before passed the checks
        key = (*signature(q), *signature(k), *signature(v))
        checked = key in _checked_dense
    except (AttributeError, TypeError):
        key, checked = None, False
    if compiling():  # (traced code keeps no host caches)
        key, checked = None, False
    if not checked:
        _check("flash_attn_func", q, k, v, varlen=False)
        if key is not None:
            _checked_dense[key] = True
    scale = _common_args("flash_attn_func", dropout_p, softmax_scale, window_size, q.shape[-1])
    out, lse = _attention(q, k, v, scale, causal, window_size, None, None, None, None,
                          bool(deterministic), key)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           deterministic=False, return_lse=False):
    """Attention over sequences of different lengths packed along one dimension.

    Args:
        q: (total_q, nheads, headdim): every sequence's queries, one after another.
        k, v: (total_k, nheads_k, headdim), packed the same way.
        cu_seqlens_q, cu_seqlens_k: int32, 1-D, ``batch + 1`` offsets each, on q's device:
            sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and rows
            ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v. The offsets start at 0, never
            decrease (empty sequences are allowed) and end at the packed row count
            (``cu_seqlens_q[-1] == total_q``, ``cu_seqlens_k[-1] == total_k``); build them as
            ``F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)``.
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence (larger is
            allowed and only launches idle programs).
        dropout_p, softmax_scale, causal, window_size, deterministic: as in
            :func:`flash_attn_func`, applied to each sequence on its own (the causal mask is
            aligned to the bottom-right of each sequence's own score matrix).
        return_lse: also return ``lse``, float32 of shape (nheads, total_q).

    Returns:
        ``out`` (total_q, nheads, headdim) in q's dtype, or ``(out, lse)``.

    Offsets are checked before any kernel runs, since the kernels form every address from them:
    wrong ones raise ``ValueError`` naming the argument, the index and the fix. On CPU tensors
    the check is always on (it is cheap). On GPU it is on by default and costs one device
    synchronization per call (the offsets are read back to the host);
    ``AITER_DIST_CHECK_VARLEN=0`` turns it off, and it is skipped while a CUDA graph is
    captured. Unchecked offsets that are wrong read and write out of bounds: undefined results
    or a crash.

    Everything else is :func:`flash_attn_func`'s, sequence by sequence: query row ``i`` of a
    sequence with ``sq`` queries and ``sk`` keys may see key ``j`` when ``i + sk - sq - left <= j
    <= i + sk - sq + right`` (bottom-right alignment; ``causal=True`` sets ``right = 0``); a row
    that sees no key (a sequence with more queries than keys under ``causal``, or with no keys)
    gets ``out`` = 0 and ``lse`` = +inf and passes no gradient. ``softmax_scale`` defaults to
    ``1 / sqrt(headdim)``; only ``dropout_p=0.0``; ``nheads`` a multiple of ``nheads_k``;
    float16 / bfloat16 / float32 (no bfloat16 on CPU), headdim a multiple of 8 up to 256.
    Gradients reach q, k and v, not ``lse``; they are bitwise reproducible with
    ``deterministic=True``, and the forward always, on the kernel paths only
    (``last_path("flash_attn")``).
    """
    op = "flash_attn_varlen_func"
    _check(op, q, k, v, varlen=True)
    _check_offsets_layout(op, q, k, cu_seqlens_q, cu_seqlens_k)
    max_seqlen_q = _seqlen_arg(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _seqlen_arg(op, "max_seqlen_k", max_seqlen_k)
    if not compiling():  # (the custom op checks them where it runs)
        _check_offsets_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _common_args(op, dropout_p, softmax_scale, window_size, q.shape[-1])
    # The kernels read offset b at cu + b: a strided view would be misread.
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out, lse = _attention(q, k, v, scale, causal, window_size, cu_q, cu_k, max_seqlen_q,
                          max_seqlen_k, bool(deterministic))
    return (out, lse) if return_lse else out
