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
fixed order, P recomputed). Memory stays linear in sequence length.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import (INTERPRETED, cdiv, check_same_device, compiling, launch, next_pow2,
                       record_path, runs_triton)

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference

def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Dense attention in the inputs' dtype (pass float64 for a reference): (out, lse)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    left, right = window_size
    right = 0 if causal else right
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _load(ptrs, row_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A tile load: rows masked only in boundary blocks, head dims only when padded."""
    if MASKED:
        if EVEN_D:
            return tl.load(ptrs, mask=row_ok, other=0.0)
        return tl.load(ptrs, mask=row_ok & d_ok, other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok, other=0.0)


@triton.jit
def _tile(BASE, b, head, t0, offs_t, offs_d, s_batch, s_seq, s_head):
    """Pointers to tokens ``t0 + offs_t`` (rows) of ``head`` in sequence ``b``, dims ``offs_d``."""
    return BASE + b.to(tl.int64) * s_batch + (t0 + offs_t).to(tl.int64)[:, None] * s_seq \
        + head * s_head + offs_d[None, :]


@triton.jit
def _head_base(T, b, head, s_batch, s_head, DESCRIPTOR: tl.constexpr):
    """Where a loop's tiles of ``head`` in sequence ``b`` come from: a tensor descriptor as it
    is (its loads take (batch, seq, head, dim) coordinates), else a pointer to the head."""
    base = T
    if not DESCRIPTOR:
        base = T + b.to(tl.int64) * s_batch + head * s_head
    return base


@triton.jit
def _visible(rows, cols, sk, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Which (row, col) pairs a boundary block may use: key in range and inside the window."""
    valid = cols < sk
    if HAS_RIGHT:
        valid = valid & (cols <= rows + shift + right)
    if HAS_LEFT:
        valid = valid & (cols >= rows + shift - left)
    return valid


@triton.jit
def _query_program(n_heads, group, HAS_RIGHT: tl.constexpr):
    """(query block, sequence, head, KV head) of a program of a (query blocks, batch x heads)
    grid. With a causal (right-bounded) window the last query blocks see the most keys: they go
    first, so the short ones fill the tail of each head's wave."""
    pid_bh = tl.program_id(1)
    h = pid_bh % n_heads
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    return pid_m, pid_bh // n_heads, h, h // group


@triton.jit
def _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q0, sq, k0, sk): first token and length of sequence ``b``'s queries and keys. Varlen
    launches pass batch strides of 0, so token offsets carry the sequence."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        return q0, tl.load(CU_Q + b + 1) - q0, k0, tl.load(CU_K + b + 1) - k0
    return 0, seqlen_q, 0, seqlen_k


@triton.jit
def _key_blocks(m0, sk, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks query rows [m0, m0 + BLOCK_M) visit, as (lo, a, c, hi): boundary blocks
    start in [lo, a) and [c, hi), where keys may be past the end or outside the window and the
    scores are masked; interior blocks in [a, c), where every row sees every key and no mask is
    computed. Skipping the masks there saves the softmax path's integer work."""
    lo = 0
    hi = sk
    if HAS_RIGHT:
        hi = tl.minimum(sk, m0 + BLOCK_M + shift + right)
    if HAS_LEFT:
        lo = tl.maximum(0, m0 + shift - left) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)  # no key visible: empty ranges, never a negative start
    full_hi = sk
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, m0 + shift + right + 1)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + shift - left, 0),
                                         BLOCK_N) * BLOCK_N)
    a = tl.minimum(full_lo, hi)
    return lo, a, tl.maximum(full_hi, a), hi


@triton.jit
def _part(part: tl.constexpr, lo, a, c, hi):
    """Bounds of a loop's part 0 (boundary blocks [lo, a)), 1 (interior [a, c), no masks) or 2
    (boundary blocks [c, hi)): a ``tl.static_range(3)`` over the parts compiles three loops."""
    start = lo
    stop = a
    if part == 1:
        start = a
        stop = c
    if part == 2:
        start = c
        stop = hi
    return start, stop


@triton.jit
def _attn_fwd_tile(acc, l_i, m_i, q, k_base, v_base, b, hk, start_n, offs_m, offs_n, offs_d, d_ok,
                   k0, sks, svs, sk, shift, left, right, qk_scale,
                   MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of the online softmax. With USE_TMA, k_base and v_base are (batch, seq,
    head, dim) tensor descriptors: the copy engine fetches the tiles (keys past the end read as
    zeros, and the masked blocks mask them)."""
    cols = start_n + offs_n
    if USE_TMA:
        kt = tl.trans(k_base.load([b, k0 + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D))
    else:
        kt = _load(k_base + (k0 + cols).to(tl.int64)[None, :] * sks + offs_d[:, None],
                   (cols < sk)[None, :], tl.trans(d_ok), MASKED, EVEN_D)
    # Raw scores; the scale is folded into the exponent's FMA (qk_scale > 0, so the row max of
    # the scaled scores is the scaled row max).
    s = tl.dot(q, kt, input_precision=PRECISION)
    if MASKED:
        s = tl.where(_visible(offs_m[:, None], cols[None, :], sk, shift, left, right, HAS_LEFT,
                              HAS_RIGHT), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(s - m_safe[:, None])
    else:  # every score is finite here
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = m_new
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_TMA:
        v = v_base.load([b, k0 + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        v = _load(v_base + (k0 + cols).to(tl.int64)[:, None] * svs + offs_d[None, :],
                  (cols < sk)[:, None], d_ok, MASKED, EVEN_D)
    # Rescale, then let the tensor cores accumulate into acc in place.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, left, right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    # USE_TMA: K and V are tensor descriptors (dense layouts only), else pointers.
    pid_m, b, h, hk = _query_program(n_heads, group, HAS_RIGHT)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q0, sq, k0, sk = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M < sq:
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        q = _load(_tile(Q, b, h, q0, offs_m, offs_d, sqb, sqs, sqh), (offs_m < sq)[:, None],
                  d_ok, True, EVEN_D)
        shift = sk - sq  # bottom-right alignment
        lo, a, c, hi = _key_blocks(m0, sk, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M,
                                   BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = _head_base(K, b, hk, skb, skh, USE_TMA)
        v_base = _head_base(V, b, hk, svb, svh, USE_TMA)
        for part in tl.static_range(3):
            start, stop = _part(part, lo, a, c, hi)
            for start_n in range(start, stop, BLOCK_N):
                acc, l_i, m_i = _attn_fwd_tile(acc, l_i, m_i, q, k_base, v_base, b, hk, start_n,
                                               offs_m, offs_n, offs_d, d_ok, k0, sks, svs, sk,
                                               shift, left, right, qk_scale, part != 1,
                                               HAS_LEFT, HAS_RIGHT, EVEN_D, PRECISION, USE_TMA,
                                               BLOCK_N, BLOCK_D)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(_tile(O, b, h, q0, offs_m, offs_d, sob, sos, soh), out.to(O.dtype.element_ty),
                 mask=(offs_m < sq)[:, None] & d_ok)
        lse = tl.where(empty, float("inf"),
                       (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(LSE + b.to(tl.int64) * slb + h * slh + q0 + offs_m, lse, mask=offs_m < sq)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU_Q, sob, sos, soh, sdob, sdos, sdoh, slb, slh, seqlen_q, n_heads,
    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id in fp32, laid out like lse: one read of each tensor."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q0, sq, _, _ = _sequence(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile(O, b, h, q0, offs_m, offs_d, sob, sos, soh), mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(_tile(DO, b, h, q0, offs_m, offs_d, sdob, sdos, sdoh), mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + b.to(tl.int64) * slb + h * slh + q0 + offs_m, tl.sum(o * do, axis=1),
             mask=offs_m < sq)


@triton.jit
def _attn_bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, dq_base, LSE, DELTA, l_off, b, h, q0,
                        start_m, offs_m0, offs_n, offs_d, d_ok, sq, sk, sqs, sdos, sdqs, shift,
                        left, right, qk_scale, sm_scale, MASKED: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
                        PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                        DQ_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query block's contribution to a key block's dK and dV, and with ATOMIC_DQ this key
    block's share of the query block's dQ, added into the fp32 accumulator at dq_base. With
    USE_TMA, q_base and do_base are tensor descriptors (rows past the end read as zeros; lse
    masks them); with DQ_TMA, dq_base is the accumulator's tensor descriptor and the copy engine
    does the adds (a bulk reduce; rows past the end are clipped)."""
    offs_m = start_m + offs_m0
    m_ok = offs_m < sq
    if USE_TMA:
        q = q_base.load([b, q0 + start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_base.load([b, q0 + start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        rows = (q0 + offs_m).to(tl.int64)[:, None]
        q = _load(q_base + rows * sqs + offs_d[None, :], m_ok[:, None], d_ok, MASKED, EVEN_D)
        do = _load(do_base + rows * sdos + offs_d[None, :], m_ok[:, None], d_ok, MASKED, EVEN_D)
    if MASKED:
        lse = tl.load(LSE + l_off + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + l_off + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE + l_off + offs_m)
        delta = tl.load(DELTA + l_off + offs_m)
    # Transposed scores: rows are keys, columns are queries.
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
    if MASKED:
        valid = _visible(offs_m[None, :], offs_n[:, None], sk, shift, left, right, HAS_LEFT,
                         HAS_RIGHT) & m_ok[None, :]
        pt = tl.where(valid, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q, input_precision=PRECISION)
    if ATOMIC_DQ:  # fp32 adds from every key block in no fixed order: not bitwise reproducible
        dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION) * sm_scale
        if DQ_TMA:
            dq_base.atomic_add([b, q0 + start_m, h, 0], dq.reshape(1, BLOCK_M, 1, BLOCK_D))
        else:
            dq_ptrs = dq_base + (q0 + offs_m).to(tl.int64)[:, None] * sdqs + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok, sem="relaxed")
            elif EVEN_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=d_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
    sdkb, sdks, sdkh, sdvb, sdvs, sdvh, sdqb, sdqs, sdqh, slb, slh,
    seqlen_q, seqlen_k, n_heads_k, group, qk_scale, sm_scale, left, right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DQ_TMA: tl.constexpr,
):
    # One key block of one KV head; loops over the query heads of its group and their blocks.
    # USE_TMA: Q and DO are tensor descriptors (dense layouts only), else pointers.
    # ATOMIC_DQ: dQ is summed here too, into the fp32 DQ_ACC (the one-kernel backward: five
    # matrix products per tile instead of seven over two kernels).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_k
    hk = pid_bh % n_heads_k
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q0, sq, k0, sk = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N < sk:
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        n_ok = (offs_n < sk)[:, None]
        k = _load(_tile(K, b, hk, k0, offs_n, offs_d, skb, sks, skh), n_ok, d_ok, True, EVEN_D)
        v = _load(_tile(V, b, hk, k0, offs_n, offs_d, svb, svs, svh), n_ok, d_ok, True, EVEN_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        shift = sk - sq
        lo = 0
        hi = sq
        if HAS_RIGHT:  # rows i with i + shift + right >= first key of the block
            lo = tl.maximum(0, n0 - shift - right) // BLOCK_M * BLOCK_M
        if HAS_LEFT:  # rows i with i + shift - left <= last key of the block
            hi = tl.minimum(sq, n0 + BLOCK_N - shift + left)
        hi = tl.maximum(hi, lo)  # no row sees this block: empty ranges
        # Query blocks that need no mask: all rows exist and see every key of this block.
        full_lo = lo
        if HAS_RIGHT:
            full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift - right, 0),
                                             BLOCK_M) * BLOCK_M)
        full_hi = sq // BLOCK_M * BLOCK_M
        if HAS_LEFT:
            full_hi = tl.minimum(full_hi, tl.maximum(n0 + 1 - shift + left, 0) // BLOCK_M
                                 * BLOCK_M)
        if n0 + BLOCK_N > sk:  # the last key block: keys past the end need the mask
            full_hi = 0
        a = tl.minimum(full_lo, hi)
        c = tl.maximum(full_hi, a)
        for g in range(group):
            h = hk * group + g
            q_base = _head_base(Q, b, h, sqb, sqh, USE_TMA)
            do_base = _head_base(DO, b, h, sdob, sdoh, USE_TMA)
            dq_base = _head_base(DQ_ACC, b, h, sdqb, sdqh, DQ_TMA)
            l_off = b.to(tl.int64) * slb + h * slh + q0
            for part in tl.static_range(3):
                start, stop = _part(part, lo, a, c, hi)
                for start_m in range(start, stop, BLOCK_M):
                    dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, dq_base, LSE,
                                                 DELTA, l_off, b, h, q0, start_m, offs_m0,
                                                 offs_n, offs_d, d_ok, sq, sk, sqs, sdos, sdqs,
                                                 shift, left, right, qk_scale, sm_scale,
                                                 part != 1, HAS_LEFT, HAS_RIGHT, EVEN_D,
                                                 PRECISION, USE_TMA, ATOMIC_DQ, DQ_TMA, BLOCK_M,
                                                 BLOCK_D)
        kv_mask = n_ok & d_ok
        tl.store(_tile(DK, b, hk, k0, offs_n, offs_d, sdkb, sdks, sdkh),
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(_tile(DV, b, hk, k0, offs_n, offs_d, sdvb, sdvs, sdvh),
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, b, hk, start_n, offs_m, offs_n,
                      offs_d, d_ok, k0, sks, svs, sk, shift, left, right, qk_scale,
                      MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                      EVEN_D: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block's contribution to a query block's dQ (USE_TMA: K and V descriptors)."""
    cols = start_n + offs_n
    if USE_TMA:
        k = k_base.load([b, k0 + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_base.load([b, k0 + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = _load(k_base + (k0 + cols).to(tl.int64)[:, None] * sks + offs_d[None, :],
                  (cols < sk)[:, None], d_ok, MASKED, EVEN_D)
        v = _load(v_base + (k0 + cols).to(tl.int64)[:, None] * svs + offs_d[None, :],
                  (cols < sk)[:, None], d_ok, MASKED, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    # Rows past the end load lse = +inf, so their p is 0 without a row mask.
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    if MASKED:
        p = tl.where(_visible(offs_m[:, None], cols[None, :], sk, shift, left, right, HAS_LEFT,
                              HAS_RIGHT), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh, slb, slh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, sm_scale, left, right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m, b, h, hk = _query_program(n_heads, group, HAS_RIGHT)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q0, sq, k0, sk = _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M < sq:
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        m_ok = offs_m < sq
        q = _load(_tile(Q, b, h, q0, offs_m, offs_d, sqb, sqs, sqh), m_ok[:, None], d_ok, True,
                  EVEN_D)
        do = _load(_tile(DO, b, h, q0, offs_m, offs_d, sdob, sdos, sdoh), m_ok[:, None], d_ok,
                   True, EVEN_D)
        lse = tl.load(LSE + b.to(tl.int64) * slb + h * slh + q0 + offs_m, mask=m_ok,
                      other=float("inf"))
        delta = tl.load(DELTA + b.to(tl.int64) * slb + h * slh + q0 + offs_m, mask=m_ok,
                        other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        shift = sk - sq
        lo, a, c, hi = _key_blocks(m0, sk, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M,
                                   BLOCK_N)
        k_base = _head_base(K, b, hk, skb, skh, USE_TMA)
        v_base = _head_base(V, b, hk, svb, svh, USE_TMA)
        for part in tl.static_range(3):
            start, stop = _part(part, lo, a, c, hi)
            for start_n in range(start, stop, BLOCK_N):
                dq = _attn_bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, b, hk, start_n,
                                       offs_m, offs_n, offs_d, d_ok, k0, sks, svs, sk, shift,
                                       left, right, qk_scale, part != 1, HAS_LEFT, HAS_RIGHT,
                                       EVEN_D, PRECISION, USE_TMA, BLOCK_N, BLOCK_D)
        tl.store(_tile(DQ, b, h, q0, offs_m, offs_d, sdqb, sdqs, sdqh),
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok)


# ----------------------------------------------------------------------------- launchers

class Blocks(NamedTuple):
    """One kernel's launch config; plain tuples of 4 to 6 items are accepted too."""
    block_m: int   # query rows per program (forward, dQ) or per step (dK/dV)
    block_n: int   # keys per step (forward, dQ) or per program (dK/dV)
    warps: int
    stages: int
    tma: bool = False     # the looped-over tiles come through tensor descriptors (Hopper)
    tma_dq: bool = False  # one-kernel backward: the copy engine adds dQ (compiled runs only)


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
    # (one kernel at best 281/299).
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
                   cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *, config=None):
    """Forward launcher: (out, lse). Dense lse is (batch, nheads, seqlen_q); varlen (nheads,
    total_q)."""
    varlen = cu_seqlens_q is not None
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
    config = Blocks(*(config or _fwd_blocks(d, q.device, sq, sk)))
    block_m, block_n, warps, stages = config[:4]
    block_d = _block_d(d)
    grid = (cdiv(max(sq, 1), block_m), batch * h)
    cu_q = cu_seqlens_q if varlen else lse  # unused placeholders when dense
    cu_k = cu_seqlens_k if varlen else lse
    use_tma, (kk, vv) = _tiles(config.tma, block_n, varlen, k, v)
    if batch * h > 0 and sq > 0:
        launch(_attn_fwd_kernel, grid, q.device,
            q, kk, vv, out, lse, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(out, varlen), *lse_strides,
            sq, sk, h, h // hk, softmax_scale * LOG2E, max(left, 0), max(right, 0),
            IS_VARLEN=varlen, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HEAD_DIM=d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PRECISION=_precision(q.dtype), USE_TMA=use_tma, num_warps=warps, num_stages=stages)
    record_path("flash_attn", ("triton-interpreter" if INTERPRETED else "triton")
                + ("-tma" if use_tma else ""))
    return out, lse


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
    if isinstance(config[0], int):
        cfg_kv = cfg_q = Blocks(*config)
    else:
        cfg_kv, cfg_q = (Blocks(*c) for c in config)
        deterministic = True
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    if batch * h > 0 and sq > 0:
        # 64 rows of any head dim keep the tile in registers (4 warps); the interpreter likes
        # whole short sequences.
        delta_rows = cfg_q.block_m if q.device.type == "cpu" else 64
        launch(_attn_bwd_delta_kernel, (cdiv(sq, delta_rows), batch * h), q.device,
            out, do, delta, cu_q, *_strides(out, varlen), *_strides(do, varlen), *lse_strides,
            sq, h, IS_VARLEN=varlen, HEAD_DIM=d, BLOCK_M=delta_rows,
            BLOCK_D=_block_d(d), num_warps=4)
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
    if batch * hk > 0 and sk > 0:
        use_tma, (qq, dd) = _tiles(cfg_kv.tma, cfg_kv.block_m, varlen, q, do)
        # The interpreter has no bulk reduce: CPU runs keep the pointer atomics.
        dq_tma, (dq_arg,) = _tiles(cfg_kv.tma_dq and not deterministic and not INTERPRETED,
                                   cfg_kv.block_m, varlen, dq)
        launch(_attn_bwd_dkdv_kernel, (cdiv(sk, cfg_kv.block_n), batch * hk), q.device,
            qq, k, v, dd, lse, delta, dk, dv, dq_arg, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(do, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
            *_strides(dq, varlen), *lse_strides, sq, sk, hk, h // hk, *scales,
            USE_TMA=use_tma, ATOMIC_DQ=not deterministic, DQ_TMA=dq_tma, **common,
            **blocks(cfg_kv))
    if not deterministic:
        record_path("flash_attn_bwd", engine + "-atomic-dq" + ("-tma" if use_tma else "")
                    + ("-bulk" if dq_tma else ""))
        return dq.to(q.dtype), dk, dv
    if batch * h > 0 and sq > 0:
        use_tma, (kk, vv) = _tiles(cfg_q.tma, cfg_q.block_n, varlen, k, v)
        launch(_attn_bwd_dq_kernel, (cdiv(sq, cfg_q.block_m), batch * h), q.device,
            q, kk, vv, do, lse, delta, dq, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(do, varlen), *_strides(dq, varlen), *lse_strides,
            sq, sk, h, h // hk, *scales, USE_TMA=use_tma, **common, **blocks(cfg_q))
    record_path("flash_attn_bwd", engine + "-deterministic" + ("-tma" if use_tma else ""))
    return dq, dk, dv


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
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
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


def _attention(q, k, v, scale, causal, window_size, cu_q, cu_k, max_q, max_k, deterministic):
    """(out, lse): through the custom op when compiling, else the autograd Function."""
    if compiling():
        return torch.ops.aiter_dist.flash_attn_fwd(q, k, v, cu_q, cu_k, max_q or 0, max_k or 0,
                                                   scale, bool(causal), int(window_size[0]),
                                                   int(window_size[1]), deterministic)
    return FlashAttnFunction.apply(q, k, v, scale, causal, tuple(window_size), cu_q, cu_k,
                                   max_q, max_k, deterministic)


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
    _check("flash_attn_func", q, k, v, varlen=False)
    scale = _common_args("flash_attn_func", dropout_p, softmax_scale, window_size, q.shape[-1])
    out, lse = _attention(q, k, v, scale, causal, window_size, None, None, None, None,
                          bool(deterministic))
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
