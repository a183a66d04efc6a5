"""conv2d's Triton kernels (forward, dgrad, wgrad on pointers and on TMA, the wgrad partial
sum, and the depthwise direct kernels) and the fp32 reference. The algorithms are described in
``conv.py``, which holds the configs, launchers, autograd Function, torch.library ops and the
public function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemm import _tile_coords


# ----------------------------------------------------------------------------- reference

def conv2d_ref(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` computed in fp32 (fp64 for fp64 inputs), returned in input's dtype."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    out = F.conv2d(input.to(acc), weight.to(acc), None if bias is None else bias.to(acc),
                   stride, padding, dilation, groups)
    return out.to(input.dtype)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _conv2d_fwd_kernel(
    X,                   # input (N, C_in, H, W) through strides sxn, sxc, sxh, sxw
    Wt,                  # weight (C_out, C_in/groups, KH, KW) through strides swo, swc, swh, sww
    BIAS,                # (C_out,), read when HAS_BIAS
    Y,                   # output (N, C_out, OH, OW) through strides syn, syc, syh, syw
    M,                   # N*OH*OW output pixels
    H, Wd, OH, OW,       # input and output spatial sizes
    CI, CO, KH, KW,      # channels per group, kernel size
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,   # pad: top / left
    HAS_BIAS: tl.constexpr,
    FLAT_K: tl.constexpr,      # K tiles run over flattened (kh, kw, c) (few channels per group)
    X_C1: tl.constexpr, W_C1: tl.constexpr,   # channel stride of X / W is 1 (vector loads)
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,   # tl.dot precision; interpreter: fp32 tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(CO, BLOCK_N),
                                GROUP_M)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < CO
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    nb = offs_m // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    if X_C1:
        x_rows = X + nb.to(tl.int64) * sxn + g * CI                          # [BLOCK_M] pointers
    else:
        x_rows = X + nb.to(tl.int64) * sxn + (g * CI).to(tl.int64) * sxc
    co = g * CO + offs_n
    w_cols = Wt + co.to(tl.int64) * swo                                     # [BLOCK_N] pointers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K = KH * KW * CI
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            c = k % CI
            kh = k // (CI * KW)
            kw = (k // CI) % KW
            k_ok = k < K
            ih = ih0[:, None] + kh[None, :] * dil_h
            iw = iw0[:, None] + kw[None, :] * dil_w
            a_ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < Wd))
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=a_ok,
                        other=0.0)
            b = tl.load(w_cols[None, :] + (c * swc + kh * swh + kw * sww)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        # One (kh, kw) tap and BLOCK_K channels per step, one flat loop (pipelined as one).
        ncb = tl.cdiv(CI, BLOCK_K)
        for it in range(KH * KW * ncb):
            cb = it % ncb
            tap = it // ncb
            kh = tap // KW
            kw = tap % KW
            c = cb * BLOCK_K + offs_k
            c_ok = c < CI
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            r_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
            if X_C1:
                xc = c
            else:
                xc = c * sxc
            if W_C1:
                wc = c
            else:
                wc = c * swc
            a = tl.load(x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + xc[None, :],
                        mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + wc[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = (Y + (nb.to(tl.int64) * syn + oh * syh + ow * syw)[:, None]
              + co.to(tl.int64)[None, :] * syc)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_dgrad_kernel(
    DY,                  # (N, C_out, OH, OW) through strides sdn, sdc, sdh, sdw
    Wt,                  # weight (C_out, C_in/groups, KH, KW) through swo, swc, swh, sww
    DX,                  # (N, C_in, H, W) output through sxn, sxc, sxh, sxw
    M,                   # N*HP*WP: rows of the largest stride phase
    H, Wd, OH, OW, HP, WP,   # HP, WP = cdiv(H, stride_h), cdiv(W, stride_w)
    CI, CO, KH, KW,      # channels per group, kernel size
    sdn, sdc, sdh, sdw, swo, swc, swh, sww, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    step_h, step_w,      # stride / gcd(stride, dilation): spacing of the taps of one phase
    DY_C1: tl.constexpr, W_C1: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dx[n, c, ih, iw] = sum over taps with oh = (ih + pad - kh*dil) / stride integral and in
    # range of dy[n, co, oh, ow] * w[co, c, kh, kw]. Program (tile, group, phase).
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(CI, BLOCK_N),
                                GROUP_M)
    g = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // stride_w
    pw = phase % stride_w
    # The phase's first tap in each dimension (step: none of them contribute).
    kh0 = step_h
    for t in range(step_h):
        hit = ((ph + pad_h - t * dil_h) % stride_h) == 0
        kh0 = tl.where(hit & (kh0 == step_h), t, kh0)
    kw0 = step_w
    for t in range(step_w):
        hit = ((pw + pad_w - t * dil_w) % stride_w) == 0
        kw0 = tl.where(hit & (kw0 == step_w), t, kw0)
    n_h = tl.where(kh0 < step_h, (tl.maximum(KH - kh0, 0) + step_h - 1) // step_h, 0)
    n_w = tl.where(kw0 < step_w, (tl.maximum(KW - kw0, 0) + step_w - 1) // step_w, 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    j = offs_m % WP
    i = (offs_m // WP) % HP
    nb = offs_m // (WP * HP)
    ih = ph + i * stride_h
    iw = pw + j * stride_w
    m_ok = (offs_m < M) & (ih < H) & (iw < Wd)
    n_ok = offs_n < CI
    if DY_C1:
        dy_rows = DY + nb.to(tl.int64) * sdn + g * CO
    else:
        dy_rows = DY + nb.to(tl.int64) * sdn + (g * CO).to(tl.int64) * sdc
    if W_C1:
        w_cols = Wt + (g * CO).to(tl.int64) * swo + offs_n
    else:
        w_cols = Wt + (g * CO).to(tl.int64) * swo + offs_n * swc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ncb = tl.cdiv(CO, BLOCK_K)
    for it in range(n_h * n_w * ncb):
        cb = it % ncb
        tap = it // ncb
        kh = kh0 + (tap // n_w) * step_h
        kw = kw0 + (tap % n_w) * step_w
        oh = i + (ph + pad_h - kh * dil_h) // stride_h     # exact division
        ow = j + (pw + pad_w - kw * dil_w) // stride_w
        r_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        co = cb * BLOCK_K + offs_k
        c_ok = co < CO
        if DY_C1:
            dc = co
        else:
            dc = co * sdc
        a = tl.load(dy_rows[:, None] + (oh * sdh + ow * sdw)[:, None] + dc[None, :],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (co.to(tl.int64) * swo)[:, None] + (kh * swh + kw * sww),
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    ci = g * CI + offs_n
    dx_ptrs = (DX + (nb.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None]
               + ci.to(tl.int64)[None, :] * sxc)
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_wgrad_kernel(
    X,                   # input (N, C_in, H, W) through sxn, sxc, sxh, sxw
    DY,                  # (N, C_out, OH, OW) through sdn, sdc, sdh, sdw
    DW_PART,             # fp32 (SPLIT, C_out, KH, KW, C_in/groups) contiguous partials
    DB_PART,             # fp32 (SPLIT, C_out) partial bias gradients, written when HAS_DB
    P,                   # N*OH*OW pixels: the reduction
    pix_per_split,       # pixels per split (a multiple of BLOCK_K)
    H, Wd, OH, OW,
    CI, CO, CO_ALL, KH, KW,   # channels per group, all output channels, kernel size
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_DB: tl.constexpr,
    FLAT_N: tl.constexpr,     # column tiles run over flattened (kh, kw, c) (few channels)
    X_C1: tl.constexpr, DY_C1: tl.constexpr,   # channel stride of X / DY is 1 (vector loads)
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dw[co, c, kh, kw] = sum_pixels dy[n, co, oh, ow] * x[n, c, oh*s - pad + kh*dil, ...]:
    # a (C_out/groups) x (KH*KW*C_in/groups) tile per program, over its split of the pixels.
    if FLAT_N:
        n_cols = tl.cdiv(KH * KW * CI, BLOCK_N)
    else:
        n_cols = KH * KW * tl.cdiv(CI, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(CO, BLOCK_M), n_cols, GROUP_M)
    g = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < CO
    co = g * CO + offs_m
    if FLAT_N:
        j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c = j % CI
        kh = j // (CI * KW)
        kw = (j // CI) % KW
        n_ok = j < KH * KW * CI
    else:
        ncb = tl.cdiv(CI, BLOCK_N)
        tap = pid_n // ncb
        kh = tap // KW
        kw = tap % KW
        c = (pid_n % ncb) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = c < CI
    if X_C1:
        xc = c
    else:
        xc = c * sxc
    if X_C1:
        x_base = X + g * CI
    else:
        x_base = X + (g * CI).to(tl.int64) * sxc
    if DY_C1:
        dy_cols = DY + co                                                   # [BLOCK_M] pointers
    else:
        dy_cols = DY + co.to(tl.int64) * sdc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = split * pix_per_split
    end = tl.minimum(start + pix_per_split, P)
    for p0 in range(start, end, BLOCK_K):
        p = p0 + offs_k
        p_ok = p < end
        ow = p % OW
        oh = (p // OW) % OH
        nb = (p // (OW * OH)).to(tl.int64)
        a = tl.load(dy_cols[:, None] + (nb * sdn + oh * sdh + ow * sdw)[None, :],
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        if FLAT_N:
            ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
            iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
            b_ok = (p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < Wd))
            b = tl.load(x_base + (nb * sxn)[:, None] + ih * sxh + iw * sxw + xc[None, :],
                        mask=b_ok, other=0.0)
        else:
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            r_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
            b = tl.load(x_base + (nb * sxn + ih * sxh + iw * sxw)[:, None] + xc[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_DB:
            db += tl.sum(a.to(tl.float32), axis=1)
    part = DW_PART + split.to(tl.int64) * CO_ALL * KH * KW * CI
    dst = (part + (co.to(tl.int64) * (KH * KW * CI))[:, None]
           + ((kh * KW + kw) * CI + c)[None, :])
    tl.store(dst, acc, mask=m_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(DB_PART + split.to(tl.int64) * CO_ALL + co, db, mask=m_ok)


@triton.jit
def _conv2d_wgrad_tma_kernel(
    X,                   # NHWC input (N, H, W, C_in), dense channels: rows read by the copy engine
    DY,                  # NHWC dy (N, OH, OW, C_out), dense channels
    DW_PART,             # (SPLIT, C_out, KH, KW, C_in) fp32 partials, or dweight itself (one split)
    DB_PART,             # fp32 (SPLIT, C_out) partial bias gradients, written when HAS_DB
    N, H, Wd, OH, OW,
    CI, CO, KH, KW,
    sxn, sxh, sxw, sdn, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    boxes_per_split,     # reduction boxes (BOX_H x BOX_W output pixels of one image) per split
    HAS_DB: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # The wgrad GEMM with both operands loaded by TMA, a tap per program. The pixels reduced are
    # boxes of output pixels; for tap (kh, kw) the input pixels under a box are a box too, of the
    # input's stride phase (ph, pw) seen with strides (s_h * sxh, s_w * sxw): no gather, and the
    # copy engine's zero fill is the padding (and zero dy past the output's edge).
    BLOCK_K: tl.constexpr = BOX_H * BOX_W
    ncb = tl.cdiv(CI, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(CO, BLOCK_M), KH * KW * ncb, GROUP_M)
    split = tl.program_id(1)
    tap = pid_n // ncb
    kh = tap // KW
    kw = tap % KW
    c0 = (pid_n % ncb) * BLOCK_N
    co0 = pid_m * BLOCK_M
    # input row of output row oh at this tap: s*oh + r = s*(oh + q) + ph, 0 <= ph < s
    r_h = kh * dil_h - pad_h
    r_w = kw * dil_w - pad_w
    ph = ((r_h % stride_h) + stride_h) % stride_h
    pw = ((r_w % stride_w) + stride_w) % stride_w
    q_h = (r_h - ph) // stride_h
    q_w = (r_w - pw) // stride_w
    h_phase = tl.cdiv(H - ph, stride_h)
    w_phase = tl.cdiv(Wd - pw, stride_w)
    x_desc = tl.make_tensor_descriptor(
        X + ph * sxh + pw * sxw, [N, tl.maximum(h_phase, 1), tl.maximum(w_phase, 1), CI],
        [sxn, stride_h * sxh, stride_w * sxw, 1], [1, BOX_H, BOX_W, BLOCK_N])
    dy_desc = tl.make_tensor_descriptor(DY, [N, OH, OW, CO], [sdn, sdh, sdw, 1],
                                        [1, BOX_H, BOX_W, BLOCK_M])
    boxes_w = tl.cdiv(OW, BOX_W)
    per_image = tl.cdiv(OH, BOX_H) * boxes_w
    start = split * boxes_per_split
    end = tl.minimum(start + boxes_per_split, N * per_image)
    no_input = h_phase <= 0 or w_phase <= 0   # every product of this tap is padding
    products_end = end
    if no_input:
        products_end = start
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for box in range(start, products_end):
        nb = box // per_image
        oh0 = (box % per_image) // boxes_w * BOX_H
        ow0 = (box % boxes_w) * BOX_W
        a = tl.reshape(dy_desc.load([nb, oh0, ow0, co0]), (BLOCK_K, BLOCK_M))
        b = tl.reshape(x_desc.load([nb, oh0 + q_h, ow0 + q_w, c0]), (BLOCK_K, BLOCK_N))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_DB:
            db += tl.sum(a.to(tl.float32), axis=0)
    if HAS_DB:
        if no_input and pid_n == 0:   # dbias still sums every dy pixel
            for box in range(start, end):
                nb = box // per_image
                oh0 = (box % per_image) // boxes_w * BOX_H
                a = tl.reshape(dy_desc.load([nb, oh0, (box % boxes_w) * BOX_W, co0]),
                               (BLOCK_K, BLOCK_M))
                db += tl.sum(a.to(tl.float32), axis=0)
    co = co0 + tl.arange(0, BLOCK_M)
    c = c0 + tl.arange(0, BLOCK_N)
    m_ok = co < CO
    part = DW_PART + split.to(tl.int64) * CO * KH * KW * CI
    dst = part + (co.to(tl.int64) * (KH * KW * CI))[:, None] + (tap * CI + c)[None, :]
    tl.store(dst, acc, mask=m_ok[:, None] & (c < CI)[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(DB_PART + split.to(tl.int64) * CO + co, db, mask=m_ok)


@triton.jit
def _sum_partials_kernel(
    PART,                # fp32 (SPLIT, C_out, KH, KW, C_in/groups) contiguous
    DW,                  # dweight (C_out, C_in/groups, KH, KW) through swo, swc, swh, sww
    TOTAL, SPLIT, KH, KW, CI,
    swo, swc, swh, sww,
    BLOCK_S: tl.constexpr, BLOCK: tl.constexpr,
):
    # dweight = sum of the split partials in a fixed order (deterministic), cast and stored with
    # the weight's own strides: one pass instead of a sum, a permute and a copy. BLOCK_S splits
    # are loaded at once: a small weight with many splits is a long reduction of few columns.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < TOTAL
    acc = tl.zeros((BLOCK_S, BLOCK), dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(PART + s.to(tl.int64)[:, None] * TOTAL + e[None, :],
                       mask=(s < SPLIT)[:, None] & ok[None, :], other=0.0)
    c = e % CI
    kw = (e // CI) % KW
    kh = (e // (CI * KW)) % KH
    co = e // (CI * KW * KH)
    tl.store(DW + co * swo + c * swc + kh * swh + kw * sww,
             tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=ok)


@triton.jit
def _dw_conv2d_fwd_kernel(
    X, Wt, BIAS, Y,      # as _conv2d_fwd_kernel; one input channel per group
    P, H, Wd, OH, OW, C_OUT, MULT, KH, KW,   # pixels, sizes, output channels, C_out / C_in
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # y[p, co] = sum_taps x[pixel(p, tap), co // MULT] * w[co, 0, tap]: elementwise in fp32.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    c_ok = co < C_OUT
    ow = offs_p % OW
    oh = (offs_p // OW) % OH
    nb = (offs_p // (OW * OH)).to(tl.int64)
    x_rows = X + nb * sxn
    x_cols = (co // MULT).to(tl.int64) * sxc
    w_cols = Wt + co.to(tl.int64) * swo
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tap in range(KH * KW):
        kh = tap // KW
        kw = tap % KW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        r_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
        x = tl.load(x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + x_cols[None, :],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_cols + kh * swh + kw * sww, mask=c_ok, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + co, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + (nb * syn + oh * syh + ow * syw)[:, None] + co.to(tl.int64)[None, :] * syc
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_conv2d_dgrad_kernel(
    DY, Wt, DX,          # dy (N, C_out, OH, OW), weight (C_out, 1, KH, KW), dx (N, C_in, H, W)
    P, H, Wd, OH, OW, C_IN, MULT, KH, KW,   # P = N*H*W input pixels
    sdn, sdc, sdh, sdw, swo, swh, sww, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx[q, c] = sum over taps and the MULT outputs of channel c, where the tap lands on an
    # output pixel (a masked gather: taps off the stride grid load nothing).
    offs_q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok = offs_q < P
    c_ok = ci < C_IN
    iw = offs_q % Wd
    ih = (offs_q // Wd) % H
    nb = (offs_q // (Wd * H)).to(tl.int64)
    dy_rows = DY + nb * sdn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for it in range(KH * KW * MULT):
        m = it % MULT
        tap = it // MULT
        kh = tap // KW
        kw = tap % KW
        th = ih + pad_h - kh * dil_h
        tw = iw + pad_w - kw * dil_w
        oh = th // stride_h
        ow = tw // stride_w
        r_ok = (q_ok & (th >= 0) & (tw >= 0) & (oh * stride_h == th) & (ow * stride_w == tw)
                & (oh < OH) & (ow < OW))
        co = (ci * MULT + m).to(tl.int64)
        dy = tl.load(dy_rows[:, None] + (oh * sdh + ow * sdw)[:, None] + (co * sdc)[None, :],
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(Wt + co * swo + kh * swh + kw * sww, mask=c_ok, other=0.0).to(tl.float32)
        acc += dy * w[None, :]
    dx_ptrs = DX + (nb * sxn + ih * sxh + iw * sxw)[:, None] + ci.to(tl.int64)[None, :] * sxc
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_conv2d_wgrad_kernel(
    X, DY,               # input (N, C_in, H, W), dy (N, C_out, OH, OW)
    DW_PART,             # fp32 (SPLIT, C_out, KH, KW) partials
    DB_PART,             # fp32 (SPLIT, C_out) partial bias gradients, written when HAS_DB
    P, pix_per_split, H, Wd, OH, OW, C_OUT, MULT, KH, KW,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_DB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (channel block, tap, split): dw[co, tap] over its pixels, fp32.
    co = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    c_ok = co < C_OUT
    dy_cols = DY + co.to(tl.int64) * sdc
    x_cols = X + (co // MULT).to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = split * pix_per_split
    end = tl.minimum(start + pix_per_split, P)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        ow = p % OW
        oh = (p // OW) % OH
        nb = (p // (OW * OH)).to(tl.int64)
        dy = tl.load(dy_cols[None, :] + (nb * sdn + oh * sdh + ow * sdw)[:, None],
                     mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        r_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < Wd)
        x = tl.load(x_cols[None, :] + (nb * sxn + ih * sxh + iw * sxw)[:, None],
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(dy * x, axis=0)
        if HAS_DB:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PART + split.to(tl.int64) * C_OUT * KH * KW + co.to(tl.int64) * (KH * KW) + tap,
             acc, mask=c_ok)
    if HAS_DB:
        if tap == 0:
            tl.store(DB_PART + split.to(tl.int64) * C_OUT + co, db, mask=c_ok)
