"""cross_entropy's Triton kernels: a row's online log-sum-exp over class blocks, the loss, and the
gradient written in the same pass or in the backward. The algorithm is described in
``cross_entropy.py``, which holds the launchers, the chunked linear + cross-entropy, the autograd
Functions, the torch.library ops and the public functions.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _targets(TGT, rows, row_mask, ignore_index, class_start, n_local, n_classes):
    """Per row: (valid: not ignored, bad: valid but outside [0, n_classes), the target's column
    among this tensor's n_local classes or -1 when it lies elsewhere). The range test runs in the
    targets' own integer type, before any narrowing."""
    t = tl.load(TGT + rows, mask=row_mask, other=ignore_index)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    local = t - class_start
    hit = valid & (local >= 0) & (local < n_local)
    return valid, bad, tl.where(hit, local, -1).to(tl.int32)


@triton.jit
def _online_lse(X, row_off, row_mask, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                WANT_SUM: tl.constexpr):
    """One read of BLOCK_M rows of C logits: (max, sum of exp(x - max), sum of x), fp32.

    Per block of classes: the block's max, then one exponential per element (a per-element
    running max would cost two, more than H200's SFUs keep up with at copy bandwidth)."""
    cols0 = tl.arange(0, BLOCK_C)[None, :]
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    xs = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols < C)
        x = tl.load(X + row_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # All -inf so far (masked rows, or -inf logits): exponents against 0, giving 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
        if WANT_SUM:
            xs += tl.sum(tl.where(mask, x, 0.0), axis=1)
    return m, s, xs


@triton.jit
def _write_grad(X, DX, row_off_x, row_off_dx, row_mask, C, lse, dl, local, valid,
                on_value, off_value, BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """dx = (exp(x - lse) - on_value * [col == local] - off_value) * dl for BLOCK_M rows of C
    columns; 0 for rows that are not valid. DX may be X (in place: each row is read before the
    same program writes it)."""
    cols0 = tl.arange(0, BLOCK_C)[None, :]
    lse2 = lse[:, None]
    dl2 = dl[:, None]
    valid2 = valid[:, None]
    local2 = local[:, None]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = row_mask[:, None] & (cols < C)
        x = tl.load(X + row_off_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse2) - tl.where(cols == local2, on_value, 0.0)
        if HAS_SMOOTHING:
            g = g - off_value
        g = tl.where(valid2, g * dl2, 0.0)
        tl.store(DX + row_off_dx + cols, g.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _row_losses(X, TGT, rows, row_mask, C, stride_x, ignore_index, label_smoothing,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """BLOCK_M rows' (loss, lse, row offsets, valid, bad, the target's column): the loss is 0
    for ignored rows and NaN for out-of-range targets."""
    row_base = rows.to(tl.int64) * stride_x  # 64-bit: M * C passes 2**31 at LLM sizes
    row_off = row_base[:, None]
    valid, bad, local = _targets(TGT, rows, row_mask, ignore_index, 0, C, C)
    m, s, xs = _online_lse(X, row_off, row_mask, C, BLOCK_M, BLOCK_C, HAS_SMOOTHING)
    lse = m + tl.log(s)
    # The target's logit: one gathered element per row, never outside the row.
    xt = tl.load(X + row_base + tl.maximum(local, 0), mask=row_mask & (local >= 0),
                 other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * xt
    if HAS_SMOOTHING:
        loss = loss - label_smoothing / C * xs
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    return loss, lse, row_off, valid, bad, local


@triton.jit
def _cross_entropy_fwd_kernel(
    X,            # (M, C) logits: rows stride_x apart, classes contiguous. WRITE_GRAD: overwritten
                  # with dlogits (this program's rows only, after it has read them)
    TGT,          # (M,) int32 / int64 class ids
    LOSS, LSE,    # (M,) fp32: the row's loss (0 ignored, NaN out-of-range target) and logsumexp
    G,            # WRITE_GRAD: the loss gradient of row i at G[i * stride_g] (stride 0: a scalar)
    M, C, stride_x, stride_g, ignore_index, label_smoothing,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    loss, lse, row_off, valid, bad, local = _row_losses(
        X, TGT, rows, row_mask, C, stride_x, ignore_index, label_smoothing, BLOCK_M, BLOCK_C,
        HAS_SMOOTHING)
    tl.store(LOSS + rows, loss, mask=row_mask)
    tl.store(LSE + rows, lse, mask=row_mask)
    if WRITE_GRAD:
        dl = tl.load(G + rows.to(tl.int64) * stride_g, mask=row_mask, other=0.0).to(tl.float32)
        dl = tl.where(bad, float("nan"), dl)
        _write_grad(X, X, row_off, row_off, row_mask, C, lse, dl, local, valid,
                    1.0 - label_smoothing, label_smoothing / C, BLOCK_C, HAS_SMOOTHING)


@triton.jit
def _cross_entropy_bwd_kernel(
    X, DX,        # (M, C) logits (rows stride_x apart) and their gradient (stride_dx); may alias
    TGT,          # (M,) class ids among n_classes; this tensor holds [class_start, class_start + C)
    LSE,          # (M,) fp32 logsumexp over all n_classes
    G,            # the loss gradient of row i at G[i * stride_g] (stride 0: a scalar)
    M, C, stride_x, stride_dx, stride_g, ignore_index, label_smoothing, class_start, n_classes,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    valid, bad, local = _targets(TGT, rows, row_mask, ignore_index, class_start, C, n_classes)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    dl = tl.load(G + rows64 * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    dl = tl.where(bad, float("nan"), dl)
    _write_grad(X, DX, rows64[:, None] * stride_x, rows64[:, None] * stride_dx, row_mask, C,
                lse, dl, local, valid, 1.0 - label_smoothing, label_smoothing / n_classes,
                BLOCK_C, HAS_SMOOTHING)


@triton.jit
def _cross_entropy_reduced_kernel(
    X, TGT,       # (M, C) logits (rows stride_x apart, classes contiguous), (M,) class ids
    OUT,          # () the sum or mean of the rows' losses, rounded once to its dtype
    M, C, stride_x, ignore_index, label_smoothing,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    MEAN: tl.constexpr,
):
    # Small problems without autograd, in one launch: one program walks the row blocks in order
    # and reduces in a fixed tree (deterministic); mean over the non-ignored rows (0/0: NaN).
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        loss, lse, row_off, valid, bad, local = _row_losses(
            X, TGT, rows, row_mask, C, stride_x, ignore_index, label_smoothing, BLOCK_M,
            BLOCK_C, HAS_SMOOTHING)
        acc += tl.where(row_mask, loss, 0.0)
        count += (valid & row_mask).to(tl.int32)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.sum(count, axis=0).to(tl.float32)
    tl.store(OUT, total.to(OUT.dtype.element_ty))


@triton.jit
def _loss_reduce_kernel(
    LOSS,         # (M,) fp32 per-row losses
    TGT,          # (M,) class ids: MEAN divides by the rows whose target is not ignore_index
    OUT,          # () the reduced loss, rounded once to its dtype
    M, ignore_index,
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program, blocks in a fixed order then a fixed tree: deterministic. 0/0 gives NaN, as
    # PyTorch's mean over no target.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for m0 in range(0, M, BLOCK):
        rows = m0 + tl.arange(0, BLOCK)
        mask = rows < M
        acc += tl.load(LOSS + rows, mask=mask, other=0.0)
        if MEAN:
            t = tl.load(TGT + rows, mask=mask, other=ignore_index)
            count += (t != ignore_index).to(tl.int32)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.sum(count, axis=0).to(tl.float32)
    tl.store(OUT, total.to(OUT.dtype.element_ty))
