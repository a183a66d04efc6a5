"""Vocabulary-parallel cross-entropy (Megatron's): the logits are sharded over the vocabulary.

Rank r holds the contiguous classes ``[r*C, (r+1)*C)`` of ``V = world*C`` for every row; the
targets are global class ids, the same on every rank. Per call:

1. one kernel pass over the local shard writes, per row, four fp32 numbers: the shard's max ``m``,
   ``s = sum exp(x - m)`` over the shard, the target's logit if the target falls in this shard
   (else 0), and the target id itself; plus one row ``(C, ignore_index, 0, 0)`` describing the
   call;
2. ONE collective: an all-gather of those (rows + 1, 4) numbers (``all_gather_raw``: the custom
   kernel or torch.distributed; ranks whose row counts differ get its mismatch error);
3. one kernel combines them in rank order: ``lse = M + log(sum_r s_r exp(m_r - M))`` with
   ``M = max_r m_r``, ``loss = lse - sum_r xt_r``. Every rank combines the same gathered bits in
   the same order, so every rank holds the same loss, bit for bit.

Rows whose ranks disagree (different targets, shard sizes or ignore_index) or whose target lies
outside ``[0, V)`` get a NaN loss; on CPU, where reading the result costs nothing, they raise
instead, on every rank alike (the checks read the gathered data). The backward needs no
communication: ``dlogits_shard = (softmax_shard - onehot_shard) * dloss`` from the global lse.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import (INTERPRETED, cdiv, compiling, launch, record_path,
                                runs_triton)
from ..kernels.cross_entropy import (REDUCTIONS, _check_common, _check_target_values, _config,
                                     _reduce, _target_dtype_error, cross_entropy_bwd,
                                     cross_entropy_ref, loss_dtype, target_rows)
from ..kernels.cross_entropy_kernels import _online_lse, _targets
from .gather_scatter import all_gather_raw
from .protocol import check_comm_input, group_name_of, group_of, resolve_group

OP = "vocab_parallel_cross_entropy"
_PATH = "triton-interpreter" if INTERPRETED else "triton"
STATS = 4  # per row: shard max, shard sum of exp(x - max), target logit or 0, target id


# ----------------------------------------------------------------------------- reference

def vocab_parallel_cross_entropy_ref(shards, target, ignore_index=-100, reduction="mean"):
    """The loss over the whole vocabulary: ``F.cross_entropy`` of the shards concatenated along
    the last dim (every rank's shard, in rank order)."""
    logits = torch.cat(list(shards), dim=-1)
    return cross_entropy_ref(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                             ignore_index, reduction).view(
        target.shape if reduction == "none" else ())


def _stats_torch(x2, target1, ignore_index, class_start):
    """The stats kernel's contract in PyTorch ops (CPU tensors on a GPU machine)."""
    M, C = x2.shape
    x = x2.float()
    m = x.amax(1) if C else x.new_full((M,), float("-inf"))
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    s = torch.exp(x - m_safe[:, None]).sum(1)
    t = target1.long()
    local = t - class_start
    hit = (t != ignore_index) & (local >= 0) & (local < C)
    xt = torch.where(hit, x.gather(1, torch.where(hit, local, 0)[:, None])[:, 0], 0.0)
    meta = x.new_tensor([[C, ignore_index, 0, 0]])
    return torch.cat([torch.stack([m, s, xt, t.float()], 1), meta])


def _combine_torch(g, target1, C, ignore_index):
    """The combine kernel's contract in PyTorch ops, on gathered (world, M + 1, 4) stats."""
    world, M = g.shape[0], g.shape[1] - 1
    st = g[:, :M]
    meta_bad = ((g[:, M, 0] != C) | (g[:, M, 1] != float(ignore_index))).any()
    mx = st[..., 0].amax(0)
    mx_safe = torch.where(mx == float("-inf"), 0.0, mx)
    total = torch.zeros_like(mx)
    xt = torch.zeros_like(mx)
    mismatch = torch.zeros(M, dtype=torch.bool, device=g.device)
    tf = target1.float()
    for r in range(world):  # rank order, as the kernel
        total = total + st[r, :, 1] * torch.exp(st[r, :, 0] - mx_safe)
        xt = xt + st[r, :, 2]
        mismatch |= st[r, :, 3] != tf
    lse = mx_safe + torch.log(total)
    t = target1.long()
    valid = t != ignore_index
    bad = (valid & ((t < 0) | (t >= C * world))) | (mismatch > 0) | (meta_bad > 0)
    loss = torch.where(valid, lse - xt, 0.0).masked_fill(bad, float("nan"))
    return loss, lse


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _vocab_parallel_stats_kernel(
    X,           # (M, C) this rank's logits shard: rows stride_x apart, classes contiguous
    TGT,         # (M,) int32 / int64 global class ids
    STATS,       # (M + 1, 4) fp32 out: per row (max, sum exp(x - max), target logit or 0, target
                 # id); row M: (C, ignore_index, 0, 0), written by program 0
    M, C, stride_x, ignore_index, class_start,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_base = rows.to(tl.int64) * stride_x
    # (range errors are the combine's business: it knows every rank's C)
    valid, bad, local = _targets(TGT, rows, row_mask, ignore_index, class_start, C, class_start + C)
    m, s, xs = _online_lse(X, row_base[:, None], row_mask, C, BLOCK_M, BLOCK_C, False)
    xt = tl.load(X + row_base + tl.maximum(local, 0), mask=row_mask & (local >= 0),
                 other=0.0).to(tl.float32)
    t = tl.load(TGT + rows, mask=row_mask, other=0).to(tl.float32)
    k = tl.arange(0, 4)[None, :]
    val = tl.where(k == 0, m[:, None], tl.where(k == 1, s[:, None],
                                                 tl.where(k == 2, xt[:, None], t[:, None])))
    tl.store(STATS + rows[:, None] * 4 + k, val, mask=row_mask[:, None] & (k < 4))
    if pid == 0:
        meta = tl.where(k == 0, C * 1.0, tl.where(k == 1, ignore_index * 1.0, 0.0))
        tl.store(STATS + M * 4 + k, meta)


@triton.jit
def _vocab_parallel_combine_kernel(
    G,           # (world, M + 1, 4) fp32: every rank's stats rows, then its meta row
    TGT,         # (M,) this rank's targets
    LOSS, LSE,   # (M,) fp32 out
    M, C, world, ignore_index,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < M
    rank_stride = (M + 1) * 4
    ign = ignore_index * 1.0
    meta_bad = tl.zeros([BLOCK], dtype=tl.int32)  # ranks whose (C, ignore_index) differ
    mx = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for r in range(world):
        base = G + r * rank_stride
        differs = (tl.load(base + M * 4) != C * 1.0) | (tl.load(base + M * 4 + 1) != ign)
        meta_bad += differs.to(tl.int32)
        mx = tl.maximum(mx, tl.load(base + rows * 4, mask=row_mask, other=float("-inf")))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    t = tl.load(TGT + rows, mask=row_mask, other=ignore_index)
    tf = t.to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    xt = tl.zeros([BLOCK], dtype=tl.float32)
    mismatch = tl.zeros([BLOCK], dtype=tl.int32)  # ranks whose target differs from this one's
    for r in range(world):  # rank order: every rank sums the same numbers the same way
        base = G + r * rank_stride + rows * 4
        m_r = tl.load(base, mask=row_mask, other=float("-inf"))
        total += tl.load(base + 1, mask=row_mask, other=0.0) * tl.exp(m_r - mx_safe)
        xt += tl.load(base + 2, mask=row_mask, other=0.0)
        mismatch += (tl.load(base + 3, mask=row_mask, other=0.0) != tf).to(tl.int32)
    lse = mx_safe + tl.log(total)
    valid = t != ignore_index
    bad = (valid & ((t < 0) | (t >= C * world))) | (mismatch > 0) | (meta_bad > 0)
    loss = tl.where(valid, lse - xt, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSS + rows, loss, mask=row_mask)
    tl.store(LSE + rows, lse, mask=row_mask)


# ----------------------------------------------------------------------------- launchers

def _check_gathered(g, target1, C, ignore_index):
    """CPU only (free there): name what the NaN rows would hide. Every rank reads the same
    gathered data, so every rank raises the same error."""
    world, M = g.shape[0], g.shape[1] - 1
    sizes = [int(v) for v in g[:, M, 0].tolist()]
    if any(v != C for v in sizes):
        raise ValueError(f"aiter_dist.{OP}: the ranks hold vocabulary shards of different sizes "
                         f"({sizes} classes on ranks 0..{world - 1}); every rank must hold V/world "
                         f"classes (pad the vocabulary to a multiple of the world size)")
    ignores = [int(v) for v in g[:, M, 1].tolist()]
    if any(v != ignore_index for v in ignores):
        raise ValueError(f"aiter_dist.{OP}: the ranks pass different ignore_index values "
                         f"({ignores}); pass the same one on every rank")
    diff = (g[:, :M, 3] != target1.float()[None]).any(0)
    if diff.any():
        i = int(diff.nonzero()[0, 0])
        raise ValueError(f"aiter_dist.{OP}: target differs between ranks at row {i} "
                         f"(ranks hold {[int(v) for v in g[:, i, 3].tolist()]}); every rank "
                         f"must pass the same global class ids")
    _check_target_values(OP, target1, C * world, ignore_index)


def vocab_parallel_cross_entropy_fwd(logits2, target1, group=None, ignore_index=-100, *,
                                     config=None, check=None):
    """Forward launcher: per-row ``(loss, lse)`` (fp32, (M,)) over the whole vocabulary.

    Args:
        logits2: (M, C) this rank's shard, classes contiguous (rows may be strided).
        target1: (M,) int64 / int32 global class ids, the same on every rank.
        group: the process group the vocabulary is sharded over (None: the world).
        check: raise on disagreeing ranks or out-of-range targets (default: on CPU, where it
            costs no synchronization); else such rows' losses are NaN.
    """
    group = resolve_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    M, C = logits2.shape
    dev = logits2.device
    kernels = runs_triton(OP, dev)
    if kernels:
        stats = torch.empty(M + 1, STATS, dtype=torch.float32, device=dev)
        block_m, block_c, num_warps = _config(C, dev, config)
        launch(_vocab_parallel_stats_kernel, (max(1, cdiv(M, block_m)),), dev,
               logits2, target1, stats, M, C, logits2.stride(0), ignore_index, rank * C,
               BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    else:
        stats = _stats_torch(logits2, target1, ignore_index, rank * C)
    g = all_gather_raw(stats, 0, group).view(world, M + 1, STATS)
    if dev.type == "cpu" if check is None else check:
        _check_gathered(g, target1, C, ignore_index)
    if not kernels:
        return _combine_torch(g, target1, C, ignore_index)
    loss = torch.empty(M, dtype=torch.float32, device=dev)
    lse = torch.empty(M, dtype=torch.float32, device=dev)
    block = 1024 if dev.type == "cpu" else 256
    if M:
        launch(_vocab_parallel_combine_kernel, (cdiv(M, block),), dev, g, target1, loss, lse,
               M, C, world, ignore_index, BLOCK=block, num_warps=1 if dev.type == "cpu" else 4)
    record_path(OP, _PATH)
    return loss, lse


def _shard_of(group, C):
    """(class_start, n_classes) of this rank's shard of C classes."""
    group = resolve_group(group)
    return dist.get_rank(group) * C, dist.get_world_size(group) * C


# ----------------------------------------------------------------------------- autograd

class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Per-row losses (fp32) over the whole vocabulary; backward: this rank's shard's gradient,
    no communication."""

    @staticmethod
    def forward(ctx, logits2, target1, group, ignore_index):
        loss, lse = vocab_parallel_cross_entropy_fwd(logits2, target1, group, ignore_index)
        ctx.save_for_backward(logits2, target1, lse)
        ctx.args = (ignore_index, 0.0, *_shard_of(group, logits2.shape[1]))
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits2, target1, lse = ctx.saved_tensors
        return cross_entropy_bwd(dloss, logits2, target1, lse, *ctx.args), None, None, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::vocab_parallel_cross_entropy", mutates_args=())
def _vocab_parallel_op(logits: torch.Tensor, target: torch.Tensor, group_name: str,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return vocab_parallel_cross_entropy_fwd(logits, target, group_of(group_name), ignore_index)


@_vocab_parallel_op.register_fake
def _(logits, target, group_name, ignore_index):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.float32))


def _vp_setup(ctx, inputs, output):
    logits, target, group_name, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (ignore_index, 0.0, *_shard_of(group_of(group_name), logits.shape[1]))


def _vp_backward(ctx, dloss, dlse):
    logits, target, lse = ctx.saved_tensors
    return (torch.ops.aiter_dist.cross_entropy_bwd(dloss, logits, target, lse, *ctx.args),
            None, None, None)


torch.library.register_autograd("aiter_dist::vocab_parallel_cross_entropy", _vp_backward,
                                setup_context=_vp_setup)


# ----------------------------------------------------------------------------- functional API

def _checks(logits, target, ignore_index, reduction):
    check_comm_input(OP, "logits", logits, ndim_min=1)
    _target_dtype_error(OP, target)
    _check_common(OP, target, ignore_index, reduction)
    if target.device != logits.device:
        raise ValueError(f"aiter_dist.{OP}: target is on {target.device} but logits are on "
                         f"{logits.device}; move them to one device")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"aiter_dist.{OP}: target shape {tuple(target.shape)} must be the "
                         f"logits' leading dims {tuple(logits.shape[:-1])} (logits are (..., "
                         f"V / world), this rank's vocabulary shard last)")
    if logits.shape[-1] == 0:
        raise ValueError(f"aiter_dist.{OP}: this rank's logits shard {tuple(logits.shape)} has "
                         f"no classes")


def vocab_parallel_cross_entropy(logits, target, group=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy over a vocabulary sharded across the ranks of ``group`` (Megatron's).

    Args:
        logits: (..., V / world), float32 / float16 / bfloat16: this rank's contiguous shard of
            the classes (rank r holds ``[r*V/world, (r+1)*V/world)``), on this rank's device.
            Every rank's shard has the same size.
        target: the logits' leading dims, int64 / int32 GLOBAL class ids in ``[0, V)`` or
            ``ignore_index``, the same on every rank.
        group: the process group (None: the default group). A group of one is plain
            cross-entropy.
        ignore_index, reduction: as :func:`aiter_dist.cross_entropy`.

    Returns:
        The loss over the whole vocabulary in the logits' dtype (float32 under
        ``torch.autocast``), the same bits on every rank.
        Autograd: this rank's shard receives its own gradient (no communication in the
        backward).

    One kernel pass over the shard, one all-gather of 4 fp32 numbers per row, one combining
    kernel. Ranks that disagree (shard sizes, targets, ignore_index) or targets outside
    ``[0, V)``: on CPU every rank raises; on GPU the affected rows' losses are NaN (checking
    would cost a synchronization). Ranks whose row counts differ get the all-gather's mismatch
    error. ``last_path("vocab_parallel_cross_entropy")`` and ``last_path("all_gather")`` name
    the paths taken.
    """
    _checks(logits, target, ignore_index, reduction)
    C = logits.shape[-1]
    x2 = logits.reshape(math.prod(logits.shape[:-1]), C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t1 = target_rows(target)
    if compiling():
        loss = torch.ops.aiter_dist.vocab_parallel_cross_entropy(x2, t1, group_name_of(group),
                                                                 ignore_index)[0]
    elif logits.requires_grad and torch.is_grad_enabled():
        loss = VocabParallelCrossEntropyFunction.apply(x2, t1, group, ignore_index)
    else:
        loss = vocab_parallel_cross_entropy_fwd(x2, t1, group, ignore_index)[0]
    return _reduce(loss, t1, ignore_index, reduction, target.shape,
                   loss_dtype(logits.dtype, logits.device))


__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_cross_entropy_ref",
           "vocab_parallel_cross_entropy_fwd", "VocabParallelCrossEntropyFunction", "REDUCTIONS"]
