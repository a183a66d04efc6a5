"""Flash attention's Triton kernels, their helpers, and the float64 reference.

The algorithm, layouts and masks are described in ``flash_attn.py``, which holds the launchers,
the autograd Function, the torch.library ops and the public functions that call these kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    group_split, sdk_split, sdv_split,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DQ_TMA: tl.constexpr,
):
    # One key block of one KV head; loops over the query heads of its group and their blocks.
    # group_split > 1: that many programs share the group (GQA: as many programs as with one
    # KV head per query head), each writing fp32 partial dK / dV at DK + split * sdk_split
    # that the launcher sums in split order.
    # USE_TMA: Q and DO are tensor descriptors (dense layouts only), else pointers.
    # ATOMIC_DQ: dQ is summed here too, into the fp32 DQ_ACC (the one-kernel backward: five
    # matrix products per tile instead of seven over two kernels).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (n_heads_k * group_split)
    hk = pid_bh // group_split % n_heads_k
    split = pid_bh % group_split
    per_split = group // group_split
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
        for g in range(per_split):
            h = hk * group + split * per_split + g
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
        dk_out = DK + split.to(tl.int64) * sdk_split
        dv_out = DV + split.to(tl.int64) * sdv_split
        tl.store(_tile(dk_out, b, hk, k0, offs_n, offs_d, sdkb, sdks, sdkh),
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(_tile(dv_out, b, hk, k0, offs_n, offs_d, sdvb, sdvs, sdvh),
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
