"""Rotary position embedding (RoPE), forward and backward, for x alone or q and k in one launch.

flash-attention's ``apply_rotary_emb`` contract. The first ``rotary_dim = 2 * cos.shape[-1]``
features of every head rotate by the angle of the token's position; the rest pass through:

    non-interleaved (GPT-NeoX): x1 = x[..., :rd/2], x2 = x[..., rd/2:rd]
        out1 = x1 * cos - x2 * sin,   out2 = x1 * sin + x2 * cos
    interleaved (GPT-J): the same rule on each pair (x[2i], x[2i+1])

Token ``t`` of sequence ``b`` sits at position ``t + seqlen_offsets[b]`` and uses row
``position`` of the (seqlen_ro, rotary_dim / 2) cos/sin tables. A rotation's inverse is its
transpose, the rotation by ``-sin``: the backward is the same kernel with ``CONJUGATE`` set.

One program per (token block of one sequence, head block): it loads the cos/sin rows of its
tokens once and rotates every head of the block with them. For ``apply_rotary_emb_qk`` the head
blocks of q and of k share one grid, so both tensors go through in one launch, one pass each.
x may be any view whose last dimension is contiguous (q/k sliced out of a fused projection);
outputs are contiguous, or x itself in place (its non-rotated features are then never written).
Math in fp32, one rounding to x's dtype.

float64 (computed in float64), zero-size inputs and CPU tensors on a GPU machine take a PyTorch
path with the same contract, recorded as ``last_path(op) == "torch"``.
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._runtime import (FLOAT_DTYPES, INTERPRETED, cdiv, check_same_device, check_tensor,
                       compiling, launch, next_pow2, record_path, runs_triton, spec_int)
# The varlen offsets follow flash attention's rules and checking policy: reuse its helpers.
from .flash_attn import _SYNC_NOTE, _checks_offset_values, _offsets_problem, _seqlen_arg

ROPE_DTYPES = FLOAT_DTYPES + (torch.float64,)
_OFFSET_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- reference

def _token_positions(x, varlen, offsets, cu_seqlens):
    """int64 position of every token of x: (batch, seqlen) dense, (total,) varlen. ``offsets``:
    an int or a (batch,) int tensor."""
    dev = x.device
    if not varlen:
        b, s = x.shape[0], x.shape[1]
        pos = torch.arange(s, device=dev).expand(b, s)
        if isinstance(offsets, torch.Tensor):
            return pos + offsets.to(dev, torch.int64)[:, None]
        return pos + int(offsets)
    rows = torch.arange(x.shape[0], device=dev)
    cu = cu_seqlens.to(dev, torch.int64)
    # Row r belongs to the sequence whose span holds it: the number of ends at or before r.
    seq = torch.searchsorted(cu[1:], rows, right=True).clamp_(max=max(cu.numel() - 2, 0))
    pos = rows - cu[seq]
    if isinstance(offsets, torch.Tensor):
        return pos + offsets.to(dev, torch.int64)[seq]
    return pos + int(offsets)


def _rotate_torch(x, cos, sin, interleaved, pos, conjugate=False, clamp=False):
    """Rotate the first 2 * cos.shape[-1] features of x (..., nheads, headdim) by the table rows
    ``pos`` (x.shape[:-2]). ``clamp``: positions outside the tables leave their token unrotated
    (the kernels' rule) instead of failing to index."""
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype, sin.dtype) else torch.float32
    half = cos.shape[-1]
    if clamp:
        valid = ((pos >= 0) & (pos < cos.shape[0]))[..., None]
        idx = pos.clamp(0, max(cos.shape[0] - 1, 0))
        if cos.shape[0] == 0:  # nothing to index: every position is off the table
            c = torch.ones(*pos.shape, half, dtype=acc, device=x.device)
            s = torch.zeros_like(c)
        else:
            c = torch.where(valid, cos.to(acc)[idx], 1.0)
            s = torch.where(valid, sin.to(acc)[idx], 0.0)
    else:
        c, s = cos.to(acc)[pos], sin.to(acc)[pos]
    if conjugate:
        s = -s
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # (..., 1, half): the same angle for every head
    xr = x[..., :2 * half].to(acc)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half:]], dim=-1)


def apply_rotary_emb_ref(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None):
    """Plain PyTorch RoPE with :func:`apply_rotary_emb`'s arguments (no in-place), math in fp32,
    or float64 where any input is float64; differentiable in x. Positions outside the tables
    fail to index (an IndexError on CPU): the reference does not paper over them."""
    pos = _token_positions(x, cu_seqlens is not None, seqlen_offsets, cu_seqlens)
    return _rotate_torch(x, cos, sin, interleaved, pos)


def _rotary_torch(x, cos, sin, interleaved, conjugate, offsets, cu_seqlens):
    """The kernels' contract in PyTorch ops (float64, zero-size, CPU tensors on GPU hosts)."""
    pos = _token_positions(x, cu_seqlens is not None, offsets, cu_seqlens)
    return _rotate_torch(x, cos, sin, interleaved, pos, conjugate=conjugate, clamp=True)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _rotary_heads(
    X, OUT,              # base pointers at this program's first token and first head
    cos, sin,            # (BLOCK_T, BLOCK_K) fp32 cos/sin of this program's tokens
    t_ok,                # (BLOCK_T,) token in its sequence
    heads_left,          # heads of this tensor from the block's first head on
    stride_xs, stride_xh, stride_os, stride_oh,  # token and head strides of x and out
    ROT_HALF: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr, OFFSETS_64: tl.constexpr,
):
    # Rotate a (BLOCK_T tokens, BLOCK_H heads) tile of one tensor; cos/sin broadcast over heads.
    t = tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    if OFFSETS_64:
        t = t.to(tl.int64)
        h = h.to(tl.int64)
    x_row = (t * stride_xs)[:, None, None] + (h * stride_xh)[None, :, None]
    o_row = (t * stride_os)[:, None, None] + (h * stride_oh)[None, :, None]
    row_ok = t_ok[:, None, None] & (h < heads_left)[None, :, None]
    cs = cos[:, None, :]
    sn = sin[:, None, :]
    if INTERLEAVED:
        # Pairs (2i, 2i+1): one contiguous load of the rotary features, split into the even and
        # odd elements (each thread holds both of a pair: no data moves between threads), and
        # joined back for one contiguous store.
        c = tl.arange(0, 2 * BLOCK_K)[None, None, :]
        if ROT_HALF == BLOCK_K:
            rot_ok = row_ok
        else:
            rot_ok = row_ok & (c < 2 * ROT_HALF)
        x = tl.load(X + x_row + c, mask=rot_ok, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_K, 2]))
        out = tl.join(x1 * cs - x2 * sn, x1 * sn + x2 * cs)
        out = tl.reshape(out, [BLOCK_T, BLOCK_H, 2 * BLOCK_K])
        tl.store(OUT + o_row + c, out.to(OUT.dtype.element_ty), mask=rot_ok)
    else:
        # Halves: each element is loaded once, both halves before either store (safe in place).
        c = tl.arange(0, BLOCK_K)[None, None, :]
        if ROT_HALF == BLOCK_K:
            rot_ok = row_ok
        else:
            rot_ok = row_ok & (c < ROT_HALF)
        x1 = tl.load(X + x_row + c, mask=rot_ok, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_row + ROT_HALF + c, mask=rot_ok, other=0.0).to(tl.float32)
        o1 = x1 * cs - x2 * sn
        o2 = x1 * sn + x2 * cs
        tl.store(OUT + o_row + c, o1.to(OUT.dtype.element_ty), mask=rot_ok)
        tl.store(OUT + o_row + ROT_HALF + c, o2.to(OUT.dtype.element_ty), mask=rot_ok)
    if COPY_TAIL:
        # Features past rotary_dim pass through (out of place only: in place they stay as is).
        j = 2 * ROT_HALF + tl.arange(0, BLOCK_TAIL)[None, None, :]
        tail_ok = row_ok & (j < HEADDIM)
        v = tl.load(X + x_row + j, mask=tail_ok, other=0.0)
        tl.store(OUT + o_row + j, v, mask=tail_ok)


@triton.jit
def _rotary_tensor(X, OUT, cos, sin, t_ok, b, row0, head_block, nheads,
                   stride_b, stride_s, stride_h, stride_ob, stride_os, stride_oh,
                   ROT_HALF: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                   INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr, OFFSETS_64: tl.constexpr):
    # The program's (sequence b, first token row0, head block) of one tensor: int64 bases, so
    # the tile's own offsets stay 32-bit.
    h0 = head_block * BLOCK_H
    _rotary_heads(X + b * stride_b + row0 * stride_s + h0.to(tl.int64) * stride_h,
                  OUT + b * stride_ob + row0 * stride_os + h0.to(tl.int64) * stride_oh,
                  cos, sin, t_ok, nheads - h0, stride_s, stride_h, stride_os, stride_oh,
                  ROT_HALF, HEADDIM, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_TAIL, INTERLEAVED,
                  COPY_TAIL, OFFSETS_64)


@triton.jit
def _rotary_kernel(
    X, OUT,              # x (batch, seqlen, nheads, headdim) or varlen (total, nheads, headdim)
    XK, OUTK,            # k and its output (HAS_K), laid out like x with nheads_k heads
    COS, SIN,            # (seqlen_ro, ROT_HALF) tables, unit last-dim stride
    CU_SEQLENS,          # (batch + 1,) int32 sequence starts (VARLEN)
    SEQLEN_OFFSETS,      # (batch,) int32/int64 position offsets (OFFSETS_TENSOR)
    offset,              # int position offset (not OFFSETS_TENSOR)
    seqlen,              # tokens per sequence (dense) or max_seqlen (varlen)
    seqlen_ro,           # rows of the tables
    t_blocks,            # token blocks per sequence: program_id(0) = b * t_blocks + block
    nheads, nheads_k,    # heads of x and of k
    q_head_blocks,       # head blocks of x: program_id(1) past them works on k
    stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,  # batch stride 0: varlen
    stride_kb, stride_ks, stride_kh, stride_okb, stride_oks, stride_okh,
    stride_cos, stride_sin,  # row strides of the tables
    ROT_HALF: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_TAIL: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    VARLEN: tl.constexpr, OFFSETS_TENSOR: tl.constexpr, HAS_K: tl.constexpr,
    COPY_TAIL: tl.constexpr, OFFSETS_64: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid // t_blocks
    t0 = (pid - b * t_blocks) * BLOCK_T  # first token of the block, within its sequence
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - start
        row0 = start.to(tl.int64) + t0
    else:
        row0 = t0.to(tl.int64)
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < seqlen
    if OFFSETS_TENSOR:
        pos = t + tl.load(SEQLEN_OFFSETS + b)
    else:
        pos = t + offset
    # Positions off the tables leave the token unrotated (cos 1, sin 0) and read nothing.
    pos_ok = t_ok & (pos >= 0) & (pos < seqlen_ro)
    k = tl.arange(0, BLOCK_K)
    cs_ok = pos_ok[:, None] & (k < ROT_HALF)[None, :]
    cos = tl.load(COS + pos[:, None] * stride_cos + k[None, :], mask=cs_ok,
                  other=1.0).to(tl.float32)
    sin = tl.load(SIN + pos[:, None] * stride_sin + k[None, :], mask=cs_ok,
                  other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    bb = b.to(tl.int64)
    # (Nested: HAS_K is decided at compile time, the head block's owner at run time.)
    if HAS_K:
        if pid_h >= q_head_blocks:
            _rotary_tensor(XK, OUTK, cos, sin, t_ok, bb, row0, pid_h - q_head_blocks, nheads_k,
                           stride_kb, stride_ks, stride_kh, stride_okb, stride_oks, stride_okh,
                           ROT_HALF, HEADDIM, BLOCK_T, BLOCK_HK, BLOCK_K, BLOCK_TAIL,
                           INTERLEAVED, COPY_TAIL, OFFSETS_64)
        else:
            _rotary_tensor(X, OUT, cos, sin, t_ok, bb, row0, pid_h, nheads,
                           stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                           ROT_HALF, HEADDIM, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_TAIL,
                           INTERLEAVED, COPY_TAIL, OFFSETS_64)
    else:
        _rotary_tensor(X, OUT, cos, sin, t_ok, bb, row0, pid_h, nheads,
                       stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                       ROT_HALF, HEADDIM, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_TAIL,
                       INTERLEAVED, COPY_TAIL, OFFSETS_64)


# ----------------------------------------------------------------------------- launchers

# Elements (padded head widths included) one GPU program rotates, and its warps. Retune here.
# H200, bf16, kernel time against BLOCK_T 1..8 x BLOCK_H 8..32 x 2..8 warps: one token's heads
# (up to 32) per program with 4 warps was best or within 1% everywhere: (8, 2048, 32, 128) 91%
# of copy bandwidth non-interleaved, 89% interleaved; headdim 64, 84% (two tokens: 80%); q/k
# views of one projection with 32 + 8 heads, 87%.
GPU_TILE_ELEMENTS = 2048  # tokens are added until a tile holds this many
GPU_MAX_TILE = 4096       # heads per program stop here (or at GPU_MAX_BLOCK_H)
GPU_NUM_WARPS = 4
GPU_MAX_BLOCK_H = 32


def _head_width(rot_half: int, headdim: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_TAIL): lanes for the rotary_dim / 2 angles (a half, or the pairs when
    interleaved) and for the pass-through tail."""
    return next_pow2(rot_half), next_pow2(max(headdim - 2 * rot_half, 1))


def rope_config(nheads: int, nheads_k: int, rot_half: int, headdim: int, interleaved: bool,
                device: torch.device, seqlen: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HK, num_warps). GPU: heads first (one cos/sin load serves them
    all), up to GPU_MAX_BLOCK_H or GPU_MAX_TILE elements, then tokens until the tile holds
    GPU_TILE_ELEMENTS; ``seqlen`` only matters on the interpreter, which pays per program: few,
    large ones there."""
    width = next_pow2(headdim)
    if device.type == "cpu":
        bh, bhk = next_pow2(nheads), next_pow2(max(nheads_k, 1))
        bt = max(1, min(next_pow2(seqlen), 16384 // (width * max(bh, bhk))))
        return bt, bh, bhk, 1
    cap = max(1, min(GPU_MAX_BLOCK_H, GPU_MAX_TILE // width))
    bh, bhk = min(next_pow2(nheads), cap), min(next_pow2(max(nheads_k, 1)), cap)
    bt = max(1, GPU_TILE_ELEMENTS // (width * max(bh, bhk)))
    return bt, bh, bhk, GPU_NUM_WARPS


_PATH = "triton-interpreter" if INTERPRETED else "triton"


def _offset_args(seqlen_offsets):
    """(tensor or None, int) from an int or a (batch,) tensor of offsets."""
    if isinstance(seqlen_offsets, torch.Tensor):
        return seqlen_offsets, 0
    return None, seqlen_offsets


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; 0 for the batch of a varlen tensor (rows are absolute)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    # Incoming gradients may be expanded (stride 0) or otherwise strided in their last dim.
    return t if t.stride(-1) == 1 else t.contiguous()


def _takes_torch_path(name, tensors, cos, sin) -> bool:
    """Whether this call is served by PyTorch ops (recorded as ``"torch"``): float64 (the kernel
    computes in fp32), zero-size inputs (nothing to launch), CPU tensors on a GPU machine."""
    if torch.float64 in (tensors[0].dtype, cos.dtype, sin.dtype):
        record_path(name, "torch", "float64 input: computed by PyTorch in float64; the Triton "
                                   "kernel takes float32, float16 and bfloat16")
        return True
    if any(t.numel() == 0 for t in tensors):
        record_path(name, "torch")
        return True
    return not runs_triton(name, tensors[0].device)


_plans: dict = {}  # a call's signature -> (grid, int args, constexprs, num_warps)
_MAX_PLANS = 4096


def _plan(key, x, k, cos, sin, interleaved, inplace, conjugate, offsets_t, varlen, max_seqlen,
          cu_numel, config):
    """Grid, int arguments and constexprs of a call with this signature (``key``); computed once
    per signature, so a call only adds its pointers and its int offset."""
    rot_half, headdim, nheads = cos.shape[-1], x.shape[-1], x.shape[-2]
    nheads_k = k.shape[-2] if k is not None else 0
    batch, seqlen = (cu_numel - 1, max_seqlen) if varlen else (x.shape[0], x.shape[1])
    if config is None:
        config = rope_config(nheads, nheads_k, rot_half, headdim, interleaved, x.device, seqlen)
    block_t, block_h, block_hk, num_warps = config
    block_k, block_tail = _head_width(rot_half, headdim)
    t_blocks = cdiv(seqlen, block_t)
    q_blocks = cdiv(nheads, block_h)
    grid = (batch * t_blocks, q_blocks + (cdiv(nheads_k, block_hk) if k is not None else 0))

    def out_strides(t):  # the output is t itself in place, else a new contiguous tensor
        if inplace:
            return _strides(t, varlen)
        row = t.shape[-2] * headdim
        return (0 if varlen else t.shape[1] * row), row, headdim

    kk = k if k is not None else x  # a placeholder when HAS_K is off
    strides = (*_strides(x, varlen), *out_strides(x), *_strides(kk, varlen), *out_strides(kk))
    ints = (seqlen, cos.shape[0], t_blocks, nheads, nheads_k, q_blocks, *strides,
            cos.stride(0), sin.stride(0))
    wide = any(block_t * st + max(block_h, block_hk) * sh + headdim >= 2**31
               for st, sh in zip(strides[1::3], strides[2::3]))
    constexprs = dict(ROT_HALF=rot_half, HEADDIM=headdim, BLOCK_T=block_t, BLOCK_H=block_h,
                      BLOCK_HK=block_hk, BLOCK_K=block_k, BLOCK_TAIL=block_tail,
                      INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate), VARLEN=varlen,
                      OFFSETS_TENSOR=offsets_t is not None, HAS_K=k is not None,
                      COPY_TAIL=(not inplace) and headdim > 2 * rot_half, OFFSETS_64=wide)
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    plan = _plans[key] = (grid, ints, constexprs, num_warps)
    return plan


def _rotary(op, x, k, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen,
            conjugate, config=None):
    """The launcher behind every entry point: (out, out_k or None). Inputs already checked."""
    offsets_t, offset = _offset_args(seqlen_offsets)
    varlen = cu_seqlens is not None
    name = op + "_bwd" if conjugate else op  # the path record's key
    if not conjugate and (offsets_t is not None or varlen):
        _check_position_values(op, x, cos, offsets_t, offset, cu_seqlens, max_seqlen)
    if _takes_torch_path(name, (x,) if k is None else (x, k), cos, sin):
        outs = []
        for t in (x,) if k is None else (x, k):
            out = _rotary_torch(t, cos, sin, interleaved, conjugate, seqlen_offsets, cu_seqlens)
            if inplace:
                rd = 2 * cos.shape[-1]
                t[..., :rd].copy_(out[..., :rd])
                out = t
            outs.append(out)
        return outs[0], (outs[1] if k is not None else None)
    if not inplace:
        x = _last_dim_unit(x)
        k = _last_dim_unit(k) if k is not None else None
    cos, sin = _last_dim_unit(cos), _last_dim_unit(sin)
    key = (x.shape, x.stride(), x.dtype, x.device,
           None if k is None else (k.shape, k.stride(), k.dtype),
           cos.shape, cos.stride(0), sin.stride(0), cos.dtype, sin.dtype, interleaved, inplace,
           conjugate, None if offsets_t is None else offsets_t.dtype,
           (max_seqlen, cu_seqlens.numel()) if varlen else None, config)
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(key, x, k, cos, sin, interleaved, inplace, conjugate, offsets_t, varlen,
                     max_seqlen, cu_seqlens.numel() if varlen else 0, config)
    grid, ints, constexprs, num_warps = plan
    out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out_k = None if k is None else k if inplace else torch.empty(k.shape, dtype=k.dtype,
                                                                 device=k.device)
    record_path(name, _PATH)
    if grid[0] == 0:  # varlen with max_seqlen 0: every sequence is empty
        return out, out_k
    kk, ok = (k, out_k) if k is not None else (x, out)  # placeholders when HAS_K is off
    cu = cu_seqlens if varlen else cos
    offs = offsets_t if offsets_t is not None else cos
    # The plan's key fixes every int and constexpr; pointers' 16-byte alignment and the offset's
    # value class complete what Triton specializes on.
    launch(_rotary_kernel, grid, x.device, x, out, kk, ok, cos, sin, cu, offs, offset, *ints,
           launch_key=(key, spec_int(offset), x.data_ptr() & 15, out.data_ptr() & 15,
                       kk.data_ptr() & 15, ok.data_ptr() & 15, cos.data_ptr() & 15,
                       sin.data_ptr() & 15, cu.data_ptr() & 15, offs.data_ptr() & 15),
           num_warps=num_warps, **constexprs)
    return out, out_k


def rotary_emb_fwd(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                   cu_seqlens=None, max_seqlen=None, *, config=None):
    """Forward launcher (checks done by the caller): the rotated x, or x itself in place."""
    return _rotary("apply_rotary_emb", x, None, cos, sin, interleaved, inplace, seqlen_offsets,
                   cu_seqlens, max_seqlen, False, config)[0]


def rotary_emb_bwd(dy, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None,
                   max_seqlen=None, *, config=None):
    """Backward launcher: dx = dy rotated by -sin (a new contiguous tensor; dy is not touched).
    Trusts the offsets the forward checked."""
    return _rotary("apply_rotary_emb", dy, None, cos, sin, interleaved, False, seqlen_offsets,
                   cu_seqlens, max_seqlen, True, config)[0]


def rotary_emb_qk_fwd(q, k, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                      cu_seqlens=None, max_seqlen=None, conjugate=False, *, config=None):
    """q and k in one launch: (q_out, k_out). ``conjugate``: rotate by -sin (the backward)."""
    return _rotary("apply_rotary_emb_qk", q, k, cos, sin, interleaved, inplace, seqlen_offsets,
                   cu_seqlens, max_seqlen, conjugate, config)


# ----------------------------------------------------------------------------- checks

_KERNEL_DTYPES = frozenset(FLOAT_DTYPES)


def _plain_call(x, k, cos, sin, seqlen_offsets, cu_seqlens) -> bool:
    """The common call in a few attribute reads: dense, an int offset that keeps every position
    in the tables, kernel dtypes, consistent shapes, one device, unit last-dim strides. Anything
    else goes through :func:`_check_rotary`, which names the problem."""
    if (cu_seqlens is not None or type(seqlen_offsets) is not int or type(x) is not torch.Tensor
            or type(cos) is not torch.Tensor or type(sin) is not torch.Tensor):
        return False
    xs, cs = x.shape, cos.shape
    if not (len(xs) == 4 and len(cs) == 2 and sin.shape == cs and 2 * cs[1] <= xs[3]
            and 0 <= seqlen_offsets and xs[1] + seqlen_offsets <= cs[0]
            and x.dtype in _KERNEL_DTYPES and cos.dtype in _KERNEL_DTYPES
            and sin.dtype in _KERNEL_DTYPES and x.stride(-1) == 1
            and x.device == cos.device == sin.device):
        return False
    return k is None or (type(k) is torch.Tensor and k.dtype == x.dtype and k.dim() == 4
                         and k.shape[:2] == xs[:2] and k.shape[3] == xs[3]
                         and k.stride(-1) == 1 and k.device == x.device)


def _check_rotary(op, tensors, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen):
    """Shapes, dtypes, devices and host-checkable positions of a call; returns max_seqlen as an
    int (None for dense). ``tensors``: {name: x} (x alone, or q and k)."""
    varlen = cu_seqlens is not None
    ndim = 3 if varlen else 4
    layout = ("(total_seqlen, nheads, headdim) with cu_seqlens" if varlen
              else "(batch, seqlen, nheads, headdim)")
    names = list(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        check_tensor(op, name, t, dtypes=ROPE_DTYPES)
        if t.dim() != ndim:
            hint = ("; pass cu_seqlens and max_seqlen for a packed (total_seqlen, nheads, "
                    "headdim) tensor" if t.dim() == 3 and not varlen else "")
            raise ValueError(f"aiter_dist.{op}: {name} must be {layout}, got shape "
                             f"{tuple(t.shape)}{hint}")
        if t.stride(-1) != 1:
            raise ValueError(f"aiter_dist.{op}: {name} must be contiguous in its last dimension "
                             f"(strides {t.stride()}); call .contiguous() first")
        if t is not first:
            if t.shape[:-2] != first.shape[:-2] or t.shape[-1] != first.shape[-1]:
                raise ValueError(f"aiter_dist.{op}: {name} {tuple(t.shape)} and {names[0]} "
                                 f"{tuple(first.shape)} must share every dimension but the "
                                 f"head count")
            if t.dtype != first.dtype:
                raise TypeError(f"aiter_dist.{op}: {name} dtype {t.dtype} differs from "
                                f"{names[0]} dtype {first.dtype}; cast one of them")
    check_tensor(op, "cos", cos, dtypes=ROPE_DTYPES)
    check_tensor(op, "sin", sin, dtypes=ROPE_DTYPES)
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"aiter_dist.{op}: cos and sin must both be (seqlen_ro, rotary_dim / 2),"
                         f" got {tuple(cos.shape)} and {tuple(sin.shape)}")
    headdim, rotary_dim = first.shape[-1], 2 * cos.shape[-1]
    if rotary_dim > headdim:
        raise ValueError(f"aiter_dist.{op}: rotary_dim = 2 * cos.shape[-1] = {rotary_dim} exceeds "
                         f"headdim {headdim}; slice the tables to at most headdim / 2 columns")
    offsets_t, offset = _offset_args(seqlen_offsets)
    if varlen and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                   or cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0):
        raise TypeError(f"aiter_dist.{op}: cu_seqlens must be a 1-D int32 tensor of batch + 1 "
                        f"offsets starting at 0; build it as torch.nn.functional.pad("
                        f"seqlens.cumsum(0), (1, 0)).to(torch.int32)")
    check_same_device(op, **tensors, cos=cos, sin=sin, cu_seqlens=cu_seqlens,
                      seqlen_offsets=offsets_t)
    batch = cu_seqlens.numel() - 1 if varlen else first.shape[0]
    if varlen:
        if max_seqlen is None:
            raise ValueError(f"aiter_dist.{op}: cu_seqlens needs max_seqlen (the longest "
                             f"sequence's length, an int)")
        max_seqlen = _seqlen_arg(op, "max_seqlen", max_seqlen)
        seqlen = max_seqlen
    else:
        seqlen = first.shape[1]
    if offsets_t is not None:
        if offsets_t.dtype not in _OFFSET_DTYPES or offsets_t.shape != (batch,):
            raise ValueError(f"aiter_dist.{op}: a tensor seqlen_offsets must be int32 or int64 of "
                             f"shape ({batch},) (one offset per sequence), got "
                             f"{offsets_t.dtype} {tuple(offsets_t.shape)}")
    else:
        if isinstance(offset, bool) or not isinstance(offset, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"aiter_dist.{op}: seqlen_offsets must be an int or a (batch,) int "
                            f"tensor, got {offset!r}")
        if offset < 0 or seqlen + offset > cos.shape[0]:
            raise ValueError(f"aiter_dist.{op}: positions up to {seqlen} + seqlen_offsets "
                             f"{offset} - 1 must lie in the cos/sin tables' {cos.shape[0]} rows; "
                             f"pass longer tables (seqlen_ro >= {seqlen + offset}) or a smaller "
                             f"offset")
    return max_seqlen if varlen else None


def _check_position_values(op, x, cos, offsets_t, offset, cu_seqlens, max_seqlen):
    """The varlen offsets' values (flash attention's rules) and the positions that tensor offsets
    give, against the tables. Free on CPU; on GPU it copies the offsets to the host (a device
    synchronization), only for varlen calls (as flash attention does, and off with
    AITER_DIST_CHECK_VARLEN=0): a dense call with tensor offsets is not checked there, and its
    tokens whose position is off the tables stay unrotated."""
    varlen = cu_seqlens is not None
    if not (x.device.type == "cpu" or (varlen and _checks_offset_values(x.device))):
        return
    seqlen_ro = cos.shape[0]
    batch = cu_seqlens.numel() - 1 if varlen else x.shape[0]
    # One transfer of the raw values (offsets, then cu_seqlens), checked with host ops.
    parts = [t.long() for t in (offsets_t, cu_seqlens) if t is not None]
    host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
    off = host[:batch] if offsets_t is not None else torch.full((batch,), offset,
                                                                 dtype=torch.long)
    if varlen:
        cu = host[-(batch + 1):]
        lens = cu[1:] - cu[:-1]
        if not (cu[0] == 0 and cu[-1] == x.shape[0] and bool((lens >= 0).all())
                and (batch == 0 or lens.max() <= max_seqlen)):
            note = "" if x.device.type == "cpu" else f" ({_SYNC_NOTE})"
            raise ValueError(f"aiter_dist.{op}: " + _offsets_problem(
                "cu_seqlens", cu.tolist(), x.shape[0], "x", "max_seqlen", max_seqlen) + note)
    else:
        lens = torch.full((batch,), x.shape[1], dtype=torch.long)
    has = lens > 0  # only sequences with tokens have positions
    if not bool(has.any()):
        return
    lo, hi = off[has].min().item(), (off + lens - 1)[has].max().item()
    if lo < 0 or hi >= seqlen_ro:
        bad = lo if lo < 0 else hi
        raise ValueError(f"aiter_dist.{op}: seqlen_offsets put a token at position {bad}, outside "
                         f"the cos/sin tables' rows 0..{seqlen_ro - 1}; pass longer tables or "
                         f"smaller offsets")


# ----------------------------------------------------------------------------- autograd

class RotaryEmbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
        out = rotary_emb_fwd(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens,
                             max_seqlen)
        offsets_t, offset = _offset_args(seqlen_offsets)
        ctx.save_for_backward(cos, sin, offsets_t, cu_seqlens)
        ctx.args = (interleaved, offset, max_seqlen)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin, offsets_t, cu_seqlens = ctx.saved_tensors
        interleaved, offset, max_seqlen = ctx.args
        dx = rotary_emb_bwd(dy, cos, sin, interleaved,
                            offsets_t if offsets_t is not None else offset, cu_seqlens,
                            max_seqlen)
        return dx, None, None, None, None, None, None, None


def _qk_bwd(dq, dk, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen):
    """(dq, dk) from the outputs' gradients; either may be None (an output went unused)."""
    if dq is not None and dk is not None:
        return rotary_emb_qk_fwd(dq, dk, cos, sin, interleaved, False, offsets, cu_seqlens,
                                 max_seqlen, conjugate=True)
    return tuple(None if g is None else rotary_emb_bwd(g, cos, sin, interleaved, offsets,
                                                       cu_seqlens, max_seqlen)
                 for g in (dq, dk))


class RotaryEmbQKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens,
                max_seqlen):
        q_out, k_out = rotary_emb_qk_fwd(q, k, cos, sin, interleaved, inplace, seqlen_offsets,
                                         cu_seqlens, max_seqlen)
        offsets_t, offset = _offset_args(seqlen_offsets)
        ctx.save_for_backward(cos, sin, offsets_t, cu_seqlens)
        ctx.args = (interleaved, offset, max_seqlen)
        ctx.set_materialize_grads(False)
        if inplace:
            ctx.mark_dirty(q, k)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, offsets_t, cu_seqlens = ctx.saved_tensors
        interleaved, offset, max_seqlen = ctx.args
        offsets = offsets_t if offsets_t is not None else offset
        dq, dk = _qk_bwd(dq, dk, cos, sin, interleaved, offsets, cu_seqlens, max_seqlen)
        return dq, dk, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- torch.library
#
# Out of place only: under torch.compile an in-place call runs the out-of-place op and copies
# the result back into x (same values, x's tail included).

@torch.library.custom_op("aiter_dist::rotary_emb", mutates_args=())
def _rotary_emb_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   seqlen_offsets: torch.Tensor | None, offset: int,
                   cu_seqlens: torch.Tensor | None, max_seqlen: int, interleaved: bool,
                   conjugate: bool) -> torch.Tensor:
    offsets = seqlen_offsets if seqlen_offsets is not None else offset
    max_s = max_seqlen if cu_seqlens is not None else None
    return _rotary("apply_rotary_emb", x, None, cos, sin, interleaved, False, offsets, cu_seqlens,
                   max_s, conjugate)[0]


@_rotary_emb_op.register_fake
def _(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return x.new_empty(x.shape)  # contiguous, as the real output is


@torch.library.custom_op("aiter_dist::rotary_emb_qk", mutates_args=())
def _rotary_emb_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      seqlen_offsets: torch.Tensor | None, offset: int,
                      cu_seqlens: torch.Tensor | None, max_seqlen: int, interleaved: bool,
                      conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = seqlen_offsets if seqlen_offsets is not None else offset
    max_s = max_seqlen if cu_seqlens is not None else None
    return rotary_emb_qk_fwd(q, k, cos, sin, interleaved, False, offsets, cu_seqlens, max_s,
                             conjugate)


@_rotary_emb_qk_op.register_fake
def _(q, k, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_setup(ctx, inputs, output):
    ctx.n_x = 2 if len(inputs) == 10 else 1
    cos, sin, offsets_t, offset, cu, max_seqlen, interleaved, conjugate = inputs[ctx.n_x:]
    ctx.save_for_backward(cos, sin, offsets_t, cu)
    ctx.args = (offset, max_seqlen, interleaved, not conjugate)


def _rotary_backward(ctx, *grads):
    cos, sin, offsets_t, cu = ctx.saved_tensors
    if ctx.n_x == 1:
        dx = torch.ops.aiter_dist.rotary_emb(grads[0], cos, sin, offsets_t, *ctx.args[:1], cu,
                                             *ctx.args[1:])
        return (dx,) + (None,) * 8
    dq, dk = torch.ops.aiter_dist.rotary_emb_qk(grads[0], grads[1], cos, sin, offsets_t,
                                                ctx.args[0], cu, *ctx.args[1:])
    return (dq, dk) + (None,) * 8


torch.library.register_autograd("aiter_dist::rotary_emb", _rotary_backward,
                                setup_context=_rotary_setup)
torch.library.register_autograd("aiter_dist::rotary_emb_qk", _rotary_backward,
                                setup_context=_rotary_setup)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ----------------------------------------------------------------------------- functional API

def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):
    """Rotary position embedding, flash-attention's ``apply_rotary_emb``.

    Args:
        x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with
            ``cu_seqlens``; float32, float16, bfloat16 or float64; contiguous in its last
            dimension, any other strides (a view of a fused projection's output is read in
            place, not copied).
        cos, sin: (seqlen_ro, rotary_dim / 2), on x's device, in any of those dtypes (fp32 tables
            with a bf16 x are the usual layout). ``rotary_dim = 2 * cos.shape[-1] <= headdim``:
            the first rotary_dim features of every head rotate, the rest pass through.
        interleaved: False (GPT-NeoX): rotate the halves ``x[..., :rd/2]`` and
            ``x[..., rd/2:rd]``: ``out1 = x1*cos - x2*sin``, ``out2 = x1*sin + x2*cos``.
            True (GPT-J): rotate the pairs ``(x[..., 2i], x[..., 2i+1])`` by the same rule.
        inplace: write the result into x and return x (its features past rotary_dim are not
            written). Autograd still works (x must not be a leaf that requires grad, as for any
            in-place op).
        seqlen_offsets: an int, or an int32/int64 (batch,) tensor on x's device: token ``t`` of
            sequence ``b`` (counted from the sequence's start, also when varlen) sits at
            position ``t + offset[b]`` and uses row ``t + offset[b]`` of the tables (KV-cache
            decoding). Positions must lie in ``[0, seqlen_ro)``.
        cu_seqlens: (batch + 1,) int32 starts of the packed sequences (0, ..., total_seqlen).
        max_seqlen: int, at least the longest packed sequence; required with cu_seqlens.

    Returns:
        A tensor of x's shape and dtype (contiguous), or x itself when ``inplace``.

    Checks: an int offset is checked against the tables on the host (``seqlen + offset <=
    seqlen_ro``; varlen: ``max_seqlen + offset``). cu_seqlens and tensor offsets are checked
    always on CPU; on GPU the varlen offsets (and tensor offsets with them) cost one device
    synchronization per call, as in :func:`flash_attn_varlen_func`
    (``AITER_DIST_CHECK_VARLEN=0`` turns it off), and dense calls with tensor offsets are not
    checked: a token whose position is off the tables is then left unrotated.

    Autograd: x receives the gradient (the rotation by -sin); cos and sin receive none (the
    tables are constants, flash-attention's convention). Math in fp32 (float64 for float64
    inputs, computed by PyTorch: ``last_path("apply_rotary_emb") == "torch"``, as for zero-size
    inputs and CPU tensors on a GPU machine), rounded once to x's dtype.
    """
    op = "apply_rotary_emb"
    if not _plain_call(x, None, cos, sin, seqlen_offsets, cu_seqlens):
        max_seqlen = _check_rotary(op, {"x": x}, cos, sin, seqlen_offsets, cu_seqlens,
                                   max_seqlen)
    if compiling():
        offsets_t, offset = _offset_args(seqlen_offsets)
        out = torch.ops.aiter_dist.rotary_emb(x, cos, sin, offsets_t, offset, cu_seqlens,
                                              max_seqlen or 0, bool(interleaved), False)
        return x.copy_(out) if inplace else out
    if _needs_grad(x):
        return RotaryEmbFunction.apply(x, cos, sin, bool(interleaved), bool(inplace),
                                       seqlen_offsets, cu_seqlens, max_seqlen)
    return rotary_emb_fwd(x, cos, sin, bool(interleaved), bool(inplace), seqlen_offsets,
                          cu_seqlens, max_seqlen)


def apply_rotary_emb_qk(q, k, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                        cu_seqlens=None, max_seqlen=None):
    """RoPE on q and k in one kernel launch (one pass over each), as an attention block's input
    path uses it: the same results as ``(apply_rotary_emb(q, ...), apply_rotary_emb(k, ...))``.

    Args:
        q: (batch, seqlen, nheads, headdim) or varlen (total_seqlen, nheads, headdim).
        k: like q with its own head count ``nheads_k`` (GQA/MQA), q's dtype and device. Both
            may be views of one fused projection's output (last dimension contiguous).
        cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen: as in
            :func:`apply_rotary_emb`, shared by q and k.

    Returns:
        ``(q_out, k_out)``: new contiguous tensors, or ``(q, k)`` themselves when ``inplace``.

    Autograd: q and k receive gradients (either output may go unused); cos and sin none. Path:
    ``last_path("apply_rotary_emb_qk")``.
    """
    op = "apply_rotary_emb_qk"
    if not _plain_call(q, k, cos, sin, seqlen_offsets, cu_seqlens):
        max_seqlen = _check_rotary(op, {"q": q, "k": k}, cos, sin, seqlen_offsets, cu_seqlens,
                                   max_seqlen)
    if compiling():
        offsets_t, offset = _offset_args(seqlen_offsets)
        q_out, k_out = torch.ops.aiter_dist.rotary_emb_qk(q, k, cos, sin, offsets_t, offset,
                                                          cu_seqlens, max_seqlen or 0,
                                                          bool(interleaved), False)
        return (q.copy_(q_out), k.copy_(k_out)) if inplace else (q_out, k_out)
    if _needs_grad(q, k):
        return RotaryEmbQKFunction.apply(q, k, cos, sin, bool(interleaved), bool(inplace),
                                         seqlen_offsets, cu_seqlens, max_seqlen)
    return rotary_emb_qk_fwd(q, k, cos, sin, bool(interleaved), bool(inplace), seqlen_offsets,
                             cu_seqlens, max_seqlen)


__all__ = ["apply_rotary_emb", "apply_rotary_emb_qk", "apply_rotary_emb_ref", "rotary_emb_fwd",
           "rotary_emb_bwd", "rotary_emb_qk_fwd", "rope_config", "RotaryEmbFunction",
           "RotaryEmbQKFunction"]
