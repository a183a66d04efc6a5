"""Cross-entropy over class logits, and cross-entropy fused with the output projection.

    cross_entropy(logits, target)              = F.cross_entropy(logits, target)
    linear_cross_entropy(x, weight, target, b) = cross_entropy(x @ weight.T + b, target),
                                                 without the (tokens, vocab) logits in memory

Per row of logits ``x`` (C classes) with target ``t`` and label smoothing ``e``:

    lse  = log(sum_j exp(x_j))
    loss = lse - (1 - e) * x_t - (e / C) * sum_j x_j        (0 for rows whose t == ignore_index)
    dx_j = (softmax(x)_j - (1 - e) * [j == t] - e / C) * dloss

The forward reads each row once (an online max / sum of exponentials over blocks of classes, in
fp32) and writes the row's loss and lse; the backward reads the logits and lse and writes dlogits:
two reads and one write of the logits in all, the memory floor. A small sum or mean without
autograd (an evaluation loss) takes one launch instead: one program computes the rows' losses
and reduces them. Rows are strided, classes contiguous; logits whose class dimension is not
last, (N, C, d1, ...), are moved to (rows, C) first (a copy, recorded in the path). Targets are
read as consecutive ids (a strided target is copied first).

``linear_cross_entropy`` runs over chunks of tokens: the chunk's logits come from one GEMM, one
kernel computes the chunk's loss and overwrites the logits with their gradient, and two more GEMMs
turn that into the chunk's rows of dx and its share of dweight. Only one chunk of logits exists at
a time.

Targets outside ``[0, C)`` that are not ``ignore_index`` are never read past the row: on CPU they
raise (the check is free there); on GPU the row's loss is NaN (and so is a mean over it), found
without a device synchronization.

The jit kernels are in ``cross_entropy_kernels.py``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._runtime import (INTERPRETED, cdiv, check_same_device, check_tensor, compiling, last_path,
                       launch, next_pow2, plan_cache, plan_device, plan_launch, record_path,
                       runs_triton, signature, takes_torch_path)
from .cross_entropy_kernels import (_cross_entropy_bwd_kernel, _cross_entropy_fwd_kernel,
                                    _cross_entropy_reduced_kernel, _loss_reduce_kernel)
from .gemm import DTYPE_NAMES, linear_backends, run_gemm

REDUCTIONS = ("none", "mean", "sum")
TARGET_DTYPES = (torch.int64, torch.int32)
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
_PATH = "triton-interpreter" if INTERPRETED else "triton"

# linear_cross_entropy: bytes of logits one chunk of tokens may hold (GPU). The chunk's rows are
# also the K of the dweight GEMM, whose (V, H) accumulator is read and written once per chunk.
# H200, 8192 tokens x 4096 x 128256 bf16, forward + backward (F.linear + F.cross_entropy: 5.87
# GiB above the inputs, 40.2 ms): 256 MB (1024 rows) 1.29 GiB, 42.2 ms; 512 MB 1.53 GiB, 40.2
# ms; 128 MB (512 rows) 1.16 GiB, 44.7 ms.
LCE_CHUNK_BYTES = 256 << 20
LCE_MIN_CHUNK_ROWS = 1024
# The interpreter: a few hundred logits (at least 8 rows) a chunk, so CPU tests run several.
LCE_CPU_CHUNK_ELEMS = 256
LCE_CPU_MIN_ROWS = 8


# ----------------------------------------------------------------------------- references

def cross_entropy_ref(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy`` in the logits' dtype (float64 logits give the float64 reference)."""
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def linear_cross_entropy_ref(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """``F.cross_entropy(F.linear(x, weight, bias))`` over every leading dim of ``x``, the GEMM
    in x's dtype (weight and bias cast to it), logits materialized: the unfused baseline."""
    logits = F.linear(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(target.shape) if reduction == "none" else loss


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ce_fwd_torch(x2, target1, ignore_index, label_smoothing):
    """The forward kernel's contract in PyTorch ops: (loss rows, lse), in fp32 (fp64 for fp64)."""
    x = x2.to(_acc_dtype(x2))
    C = x.shape[1]
    lse = torch.logsumexp(x, dim=1)
    t = target1.long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= C))
    xt = x.gather(1, torch.where(valid & ~bad, t, 0)[:, None])[:, 0]
    loss = lse - (1.0 - label_smoothing) * xt
    if label_smoothing:
        loss = loss - label_smoothing / C * x.sum(1)
    loss = torch.where(valid, loss, 0.0).masked_fill(bad, float("nan"))
    return loss, lse


def _ce_grad_torch(dloss, x2, target1, lse, ignore_index, label_smoothing, class_start,
                   n_classes):
    """The backward kernel's contract in PyTorch ops: dlogits of the columns
    ``[class_start, class_start + C)`` of ``n_classes``, in x2's dtype."""
    acc = _acc_dtype(x2)
    p = torch.exp(x2.to(acc) - lse.to(acc)[:, None])
    t = target1.long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    local = t - class_start
    hit = valid & (local >= 0) & (local < x2.shape[1])
    p[hit, local[hit]] -= 1.0 - label_smoothing
    if label_smoothing:
        p -= label_smoothing / n_classes
    dl = dloss.to(acc).expand(x2.shape[0]).masked_fill(bad, float("nan"))
    return torch.where(valid[:, None], p * dl[:, None], 0.0).to(x2.dtype)


# ----------------------------------------------------------------------------- launchers

def ce_config(C: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_C classes per loop step, num_warps) for all the kernels.

    The knob to retune on a GPU. Wide rows (vocabularies) take one row per program and loop over
    the classes; narrow rows are packed several to a program."""
    if device.type == "cpu":
        # The interpreter pays per program and per loop step, not per element; 256 classes a
        # step still lets small CPU tests run the online loop over several blocks.
        block_c = min(next_pow2(C), 256)
        return max(1, min(64, 4096 // block_c)), block_c, 1
    # H200, 4096 x 128256 bf16 (one row a program): 8192 classes a step with 8 warps ran the
    # forward at 89% of copy bandwidth, the backward at 91%, the forward that writes the gradient
    # at 89%; 4096 with 16 warps at 56 / 76 / 80%, 1024 with 4 warps at 64 / 79 / 84%.
    # Narrow rows are latency-bound (65536 x 37: 15 us): few rows and warps a program won there,
    # (4, 64, 1) over (64, 64, 4) at 41 us; 16384 x 1000: (1, 1024, 2), 21 / 27 us.
    block_c = min(next_pow2(C), 8192)
    if block_c >= 2048:
        return 1, block_c, 8 if block_c >= 8192 else 4
    block_m = max(1, 256 // block_c)
    return block_m, block_c, max(1, min(4, block_m * block_c // 512))


_configs: dict = {}


def _config(C: int, device: torch.device, config):
    if config is not None:
        return config
    key = (C, device.type)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = _configs[key] = ce_config(C, device)
    return cfg


def cross_entropy_fwd(logits2, target1, ignore_index=-100, label_smoothing=0.0, *, grad=None,
                      out=None, config=None, op="cross_entropy"):
    """Forward launcher: per-row ``(loss, lse)`` of (M, C) logits, fp32 (float64 for float64).

    Args:
        logits2: (M, C), classes contiguous (rows may be strided).
        target1: (M,) int64 / int32.
        grad: None, or the loss gradient per row, broadcast over rows (a 0-d tensor, or (M,)):
            the logits are then overwritten in place with their gradient.
        out: optional (loss, lse) tensors of (M,) fp32 to write into.
    """
    M, C = logits2.shape
    if out is None:
        acc = _acc_dtype(logits2)
        out = (torch.empty(M, dtype=acc, device=logits2.device),
               torch.empty(M, dtype=acc, device=logits2.device))
    loss, lse = out
    if takes_torch_path(op, (logits2,)):
        loss_t, lse_t = _ce_fwd_torch(logits2, target1, ignore_index, label_smoothing)
        loss.copy_(loss_t)
        lse.copy_(lse_t)
        if grad is not None:
            logits2.copy_(_ce_grad_torch(grad, logits2, target1, lse_t, ignore_index,
                                         label_smoothing, 0, C))
        return loss, lse
    block_m, block_c, num_warps = _config(C, logits2.device, config)
    g = grad if grad is not None else lse
    launch(_cross_entropy_fwd_kernel, (cdiv(M, block_m),), logits2.device,
           logits2, target1, loss, lse, g, M, C, logits2.stride(0),
           g.stride(0) if g.dim() else 0, ignore_index, float(label_smoothing),
           BLOCK_M=block_m, BLOCK_C=block_c, HAS_SMOOTHING=label_smoothing != 0,
           WRITE_GRAD=grad is not None, num_warps=num_warps)
    record_path(op, _PATH)
    return loss, lse


# Up to this many logits, a call without autograd that reduces (sum / mean) takes one launch:
# one program computes every row's loss and reduces them, saving a launch's host time (~10 us on
# the H200 hosts). GPU time against the two kernels (H200, bf16, graph replay, 16K-logit blocks
# on 8 warps): 8 x 1024 3.04 us vs 3.10; 4 x 16384 8.2 vs 5.1; 64 x 1024 12.3 vs 3.9.
ONE_LAUNCH_MAX_LOGITS = 1 << 13


# The one program's block of logits and warps: its loop is latency-bound (a dependent gather of
# the target's logit per block of rows), so it takes as many rows a step as registers allow.
ONE_LAUNCH_BLOCK, ONE_LAUNCH_WARPS = 16384, 8


def _one_launch_config(M: int, C: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) of the one-program kernel."""
    if device.type == "cpu":
        return ce_config(C, device)
    block_c = min(next_pow2(C), ONE_LAUNCH_BLOCK)
    return (max(1, min(next_pow2(M), ONE_LAUNCH_BLOCK // block_c)), block_c,
            ONE_LAUNCH_WARPS)


def cross_entropy_reduced(logits2, target1, ignore_index, label_smoothing, reduction, dtype,
                          planned=False):
    """One launch: the ``reduction`` (``"sum"`` or ``"mean"``) of the rows' losses of (M, C)
    logits as a 0-d tensor of ``dtype``. Returns ``(loss, plan)``; the plan (``planned``: None
    otherwise, or for misaligned pointers) repeats the launch for a call of the same
    signature: see :func:`_planned_reduced`."""
    M, C = logits2.shape
    out = torch.empty((), dtype=dtype, device=logits2.device)
    block_m, block_c, num_warps = _one_launch_config(M, C, logits2.device)
    ints = (M, C, logits2.stride(0), ignore_index)
    plan = (plan_launch if planned else launch)(
        _cross_entropy_reduced_kernel, (1,), logits2.device, logits2, target1, out, *ints,
        float(label_smoothing), BLOCK_M=block_m, BLOCK_C=block_c,
        HAS_SMOOTHING=label_smoothing != 0, MEAN=reduction == "mean", num_warps=num_warps)
    record_path("cross_entropy", _PATH)
    if not planned or plan is None:
        return out, None
    plan.extra = (ints, float(label_smoothing), dtype)
    return out, plan


# (logits, target signatures, ignore_index and label_smoothing with their types, reduction, the
# loss dtype, current device) -> the one-launch kernel's LaunchPlan, for calls without autograd.
_reduced_plans = plan_cache()


def _planned_reduced(plan, logits, target):
    """cross_entropy_reduced from its plan: the output, one launch, the path record."""
    ints, label_smoothing, dtype = plan.extra
    if logits.device.type == "cpu":  # (CPU targets are value-checked on every call)
        _check_target_values("cross_entropy", target, ints[1], ints[3])
    out = torch.empty((), dtype=dtype, device=logits.device)
    plan(logits, target, out, *ints, label_smoothing)
    record_path("cross_entropy", _PATH)
    return out


def cross_entropy_bwd(dloss, logits2, target1, lse, ignore_index=-100, label_smoothing=0.0,
                      class_start=0, n_classes=None, *, out=None, config=None,
                      op="cross_entropy_bwd"):
    """Backward launcher: dlogits (M, C) in the logits' dtype, contiguous (or into ``out``,
    which may be ``logits2`` itself).

    ``dloss``: the loss gradient per row, (M,) with any stride or 0-d. ``class_start`` and
    ``n_classes``: the logits are columns ``[class_start, class_start + C)`` of ``n_classes``
    classes (a vocabulary shard; default: all of them); targets are ids among ``n_classes``."""
    M, C = logits2.shape
    n_classes = C if n_classes is None else n_classes
    if out is None:
        out = torch.empty(M, C, dtype=logits2.dtype, device=logits2.device)
    if takes_torch_path(op, (logits2,)):
        out.copy_(_ce_grad_torch(dloss, logits2, target1, lse, ignore_index, label_smoothing,
                                 class_start, n_classes))
        return out
    block_m, block_c, num_warps = _config(C, logits2.device, config)
    launch(_cross_entropy_bwd_kernel, (cdiv(M, block_m),), logits2.device,
           logits2, out, target1, lse, dloss, M, C, logits2.stride(0), out.stride(0),
           dloss.stride(0) if dloss.dim() else 0, ignore_index, float(label_smoothing),
           class_start, n_classes, BLOCK_M=block_m, BLOCK_C=block_c,
           HAS_SMOOTHING=label_smoothing != 0, num_warps=num_warps)
    record_path(op, _PATH)
    return out


# ----------------------------------------------------------------------------- checks and layout

def _check_target_values(op, target, n_classes, ignore_index):
    """On CPU, where it costs no synchronization: targets outside [0, n_classes) that are not
    ignore_index raise (on GPU their rows' losses are NaN instead)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"aiter_dist.{op}: target[{i}] (flattened) is {int(t[i])}, outside "
                         f"[0, {n_classes}) and not ignore_index ({ignore_index}); targets are "
                         f"class ids below the number of classes (on GPU such a row's loss is "
                         f"NaN)")


def _check_common(op, target, ignore_index, reduction):
    check_tensor(op, "target", target, dtypes=TARGET_DTYPES, ndim_min=0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"aiter_dist.{op}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"aiter_dist.{op}: reduction must be one of {REDUCTIONS}, got "
                         f"{reduction!r}")


def _target_dtype_error(op, target):
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError(f"aiter_dist.{op}: target has dtype {target.dtype}; pass class indices "
                        f"(int64 or int32): class probabilities are not supported")


def _ce_layout(logits, target, ignore_index, reduction, label_smoothing):
    """Checks, then ``(logits2 (rows, C), target1 (rows,))`` for any accepted layout."""
    op = "cross_entropy"
    check_tensor(op, "logits", logits, dtypes=LOGIT_DTYPES)
    _target_dtype_error(op, target)
    _check_common(op, target, ignore_index, reduction)
    check_same_device(op, logits=logits, target=target)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"aiter_dist.{op}: label_smoothing must be a float in [0, 1], got "
                         f"{label_smoothing!r}")
    d = logits.dim()
    expected = () if d == 1 else (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"aiter_dist.{op}: target shape {tuple(target.shape)} does not match "
                         f"logits {tuple(logits.shape)}: expected {expected} (logits are (C,), "
                         f"(N, C) or (N, C, d1, ...) with the classes in dimension "
                         f"{0 if d == 1 else 1})")
    C = logits.shape[0 if d == 1 else 1]
    if C == 0:
        raise ValueError(f"aiter_dist.{op}: logits {tuple(logits.shape)} have no classes")
    if not compiling():
        _check_target_values(op, target, C, ignore_index)
    if d == 1:
        return logits.reshape(1, C), target.reshape(1)  # (one element: no stride to follow)
    if d == 2 and logits.stride(1) == 1:
        return logits, target_rows(target)
    moved = logits.movedim(1, -1)
    x2 = moved.reshape(-1, C)
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), target_rows(target)


def target_rows(target):
    """(rows,) class ids at consecutive addresses, as the kernels read them: the target
    flattened, copied where its elements are not (a strided or expanded target). A 1-D target
    that serves is returned itself (a launch plan is kept only for the caller's own tensor)."""
    t = target if target.dim() == 1 else target.reshape(-1)
    return t if t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def _plain_ce(logits, target) -> bool:
    """The common case in a few attribute reads: (N, C) logits of a kernel dtype, classes
    contiguous, (N,) consecutive targets on the same device (not on CPU: CPU targets are
    value-checked)."""
    return (type(logits) is torch.Tensor and type(target) is torch.Tensor
            and logits.dtype in _KERNEL_DTYPES and logits.dim() == 2
            and target.dtype in TARGET_DTYPES and target.dim() == 1 and target.stride(0) == 1
            and target.shape[0] == logits.shape[0] and logits.device == target.device
            and logits.device.type != "cpu" and logits.stride(1) == 1 and logits.shape[1] != 0)


def loss_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The loss's dtype: the input's, or float32 under ``torch.autocast`` on ``device`` (where
    PyTorch's own losses run in float32), so a bf16 training loop logs an unrounded loss."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type) \
            and dtype != torch.float64:
        return torch.float32
    return dtype


# Up to this many rows, a call without autograd reduces its losses in one kernel (one program:
# ~1 us of GPU time per 1024 rows) instead of four PyTorch ops (sum, compare, sum, divide, and
# the cast: each a launch, ~10 us of host time apiece).
REDUCE_KERNEL_MAX_ROWS = 16384


def _reduce(loss_rows, target1, ignore_index, reduction, shape, dtype):
    """none / sum / mean (over non-ignored targets: 0/0 is NaN, as in PyTorch) of fp32 rows,
    rounded once to ``dtype``."""
    if reduction == "none":
        return loss_rows.view(shape).to(dtype)
    if (not loss_rows.requires_grad and loss_rows.dtype == torch.float32
            and 0 < loss_rows.numel() <= REDUCE_KERNEL_MAX_ROWS and not compiling()
            and runs_triton("cross_entropy", loss_rows.device)):
        out = torch.empty((), dtype=dtype, device=loss_rows.device)
        launch(_loss_reduce_kernel, (1,), loss_rows.device, loss_rows, target1, out,
               loss_rows.numel(), ignore_index, MEAN=reduction == "mean", BLOCK=1024,
               num_warps=4)
        return out
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / (target1 != ignore_index).sum()
    return total.to(dtype)


# ----------------------------------------------------------------------------- linear + CE

@functools.lru_cache(maxsize=None)
def _addmm_out_dtype(device: torch.device) -> bool:
    """Whether this torch's addmm accumulates 16-bit products into an fp32 ``out`` on
    ``device`` (``out_dtype=``; CUDA in recent releases)."""
    if device.type != "cuda":
        return False
    try:  # (no read back: this may first run inside a CUDA graph capture)
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        c = torch.zeros(16, 16, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _gemm_into(out, a, b, bias, backend, op):
    """out = a @ b (+ bias): our GEMM (``backend == "triton"``) or the vendor's, into ``out``."""
    if backend == "triton":
        run_gemm(op, DTYPE_NAMES[a.dtype], a, b, out, bias)
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _wgrad_into(dw, dl, xc, first):
    """dw (+)= dl.T @ xc into a buffer of the weight's dtype: in place when the dtypes match
    (a 16-bit weight accumulates in 16 bits, chunk after chunk, as Liger-Kernel does); an fp32
    buffer of 16-bit products accumulates in fp32 (``out_dtype`` where torch has it; exact fp32
    products on CPU; else each chunk's product rounded to the compute dtype)."""
    if dw.dtype == dl.dtype:
        if first:
            torch.mm(dl.t(), xc, out=dw)
        else:
            dw.addmm_(dl.t(), xc)
    elif dw.dtype == torch.float32 and _addmm_out_dtype(dw.device):
        torch.addmm(dw, dl.t(), xc, beta=0 if first else 1, out_dtype=torch.float32, out=dw)
    elif dw.device.type == "cpu":
        dw.addmm_(dl.t().to(dw.dtype), xc.to(dw.dtype), beta=0 if first else 1)
    elif first:
        dw.copy_(dl.t() @ xc)
    else:
        dw.add_(dl.t() @ xc)


def lce_chunk_rows(T: int, V: int, H: int, elem_size: int, device: torch.device) -> int:
    """Tokens per chunk of ``linear_cross_entropy``: the knob that trades memory for GEMM
    efficiency. GPU: ``LCE_CHUNK_BYTES`` of logits, at least ``LCE_MIN_CHUNK_ROWS`` rows
    (multiples of 256); CPU: ``LCE_CPU_CHUNK_ELEMS`` logits, at least ``LCE_CPU_MIN_ROWS`` rows
    (tests see several chunks). H is
    an argument for retuning (the dx and dweight GEMMs grow with it)."""
    if device.type == "cpu":
        rows = max(LCE_CPU_MIN_ROWS, LCE_CPU_CHUNK_ELEMS // V)
    else:
        rows = max(LCE_MIN_CHUNK_ROWS, LCE_CHUNK_BYTES // (V * elem_size) // 256 * 256)
    return max(1, min(rows, T))


def _lce_backends(op, rows, V, H, dtype, device):
    """Who computes the logits and the chunk's dx: the GEMM table's winners (vendor where it
    has not measured), as ``tgemm.mm`` does; CPU tensors take the vendor's (BLAS)."""
    if dtype == torch.float64 or device.type == "cpu":
        return "vendor", "vendor"
    b = linear_backends(op, rows, V, H, dtype, device, "auto", prefer="vendor")
    return b[0], b[1]


def _count_scale(target1, ignore_index, reduction, device):
    """The factor the per-row losses' gradient carries: 1/count for mean, 1 for sum."""
    if reduction == "mean":
        return (target1 != ignore_index).sum().to(torch.float32).reciprocal()
    return torch.ones((), dtype=torch.float32, device=device)


class _NoAutocast:
    """Autocast off inside the chunk loop (its GEMMs write into buffers with ``out=``, in the
    dtype chosen already); a no-op unless autocast is on."""

    def __init__(self, device):
        self.ctx = torch.autocast(device.type, enabled=False) \
            if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type) else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _lce_chunks(x2, weight, target1, bias, ignore_index, cd, need, *, rows=None, dloss=None,
                chunk_rows=None, config=None):
    """The chunk loop of ``linear_cross_entropy``, forward or backward.

    Per chunk of tokens: logits = x @ weight.T + bias (compute dtype ``cd``), then either
    (forward, ``rows = (loss_rows, lse, scale)``) the forward kernel, which writes the rows'
    loss and lse and, when ``scale`` is a tensor, overwrites the logits with their gradient
    times ``scale``; or (backward, ``dloss`` and ``rows = (lse,)``) the backward kernel, which
    overwrites them with their gradient times ``dloss``. Then the chunk's rows of dx, its share
    of dw (in the weight's dtype) and of db (fp32), for the ones ``need`` asks for.
    Returns (dx, dw, db), None where not asked for.
    """
    op = "linear_cross_entropy"
    T, H = x2.shape
    V = weight.shape[0]
    dev = x2.device
    acc = torch.float64 if cd == torch.float64 else torch.float32
    need_dx, need_dw, need_db = need
    dx = torch.empty(T, H, dtype=cd, device=dev) if need_dx else None
    dw = torch.empty(V, H, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=dev) if need_db else None
    if dw is not None and T == 0:
        dw.zero_()
    xc, wc = x2.to(cd), weight.to(cd)
    bc = bias.to(cd) if bias is not None else None
    chunk = chunk_rows or lce_chunk_rows(T, V, H, xc.element_size(), dev)
    fwd_b, dgrad_b = _lce_backends(op, min(chunk, T), V, H, cd, dev)
    if fwd_b == "vendor":
        record_path(op + ".logits", "torch.mm")
    if need_dx and dgrad_b == "vendor":
        record_path(op + ".dgrad", "torch.mm")
    if need_dw:
        record_path(op + ".wgrad", "torch.addmm")
    buf = torch.empty(min(chunk, T), V, dtype=cd, device=dev)
    wct = wc.t()
    with _NoAutocast(dev):
        for a in range(0, T, chunk):
            b = min(a + chunk, T)
            lg, xa = buf[:b - a], xc[a:b]
            _gemm_into(lg, xa, wct, bc, fwd_b, op + ".logits")
            if dloss is None:
                loss_rows, lse, scale = rows
                cross_entropy_fwd(lg, target1[a:b], ignore_index, 0.0, grad=scale,
                                  out=(loss_rows[a:b], lse[a:b]), config=config, op=op)
            else:
                cross_entropy_bwd(dloss[a:b], lg, target1[a:b], rows[0][a:b], ignore_index,
                                  out=lg, config=config, op=op + "_bwd")
            if dx is not None:
                _gemm_into(dx[a:b], lg, wc, None, dgrad_b, op + ".dgrad")
            if dw is not None:
                _wgrad_into(dw, lg, xa, first=a == 0)
            if db is not None:
                db += lg.sum(0, dtype=acc)
    if T == 0:
        record_path(op, "torch")
    return dx, dw, db


def linear_cross_entropy_fwd(x2, weight, target1, bias, ignore_index=-100, reduction="mean",
                             need_dx=False, need_dw=False, need_db=False, compute_dtype=None,
                             *, chunk_rows=None, config=None):
    """Forward launcher of :func:`linear_cross_entropy` over chunks of tokens.

    Args:
        x2: (T, H); weight: (V, H); target1: (T,); bias: (V,) or None.
        need_dx, need_dw, need_db: with reduction mean/sum, compute these gradients (of the
            loss itself: the backward multiplies them by the incoming scalar gradient).
        compute_dtype: the GEMMs' dtype (default x2's).
        chunk_rows: tokens per chunk (default ``lce_chunk_rows``); config: the kernels'.

    Returns:
        ``(loss, lse, dx, dw, db)``: the reduced loss (mean/sum: 0-d; none: (T,)) in fp32
        (fp64 for fp64; the public function rounds it), lse (T,) fp32, dx (T, H) in the compute dtype, dw (V, H) in the weight's
        dtype, db (V,) fp32; a gradient not computed is None.
    """
    T = x2.shape[0]
    cd = compute_dtype or x2.dtype
    acc = torch.float64 if cd == torch.float64 else torch.float32
    loss_rows = torch.empty(T, dtype=acc, device=x2.device)
    lse = torch.empty(T, dtype=acc, device=x2.device)
    need = (need_dx, need_dw, need_db and bias is not None) if reduction != "none" \
        else (False, False, False)
    scale = _count_scale(target1, ignore_index, reduction, x2.device) if any(need) else None
    dx, dw, db = _lce_chunks(x2, weight, target1, bias, ignore_index, cd, need,
                             rows=(loss_rows, lse, scale), chunk_rows=chunk_rows, config=config)
    loss = _reduce(loss_rows, target1, ignore_index, reduction, (T,), acc)
    return loss, lse, dx, dw, db


def linear_cross_entropy_bwd(dloss, x2, weight, target1, bias, lse, ignore_index=-100,
                             need_dx=True, need_dw=True, need_db=True, compute_dtype=None,
                             *, chunk_rows=None, config=None):
    """Backward launcher of reduction="none": recompute each chunk's logits and turn them into
    their gradient times ``dloss`` (T,) (any stride). Returns (dx, dw, db) as
    :func:`linear_cross_entropy_fwd` does."""
    return _lce_chunks(x2, weight, target1, bias, ignore_index, compute_dtype or x2.dtype,
                       (need_dx, need_dw, bias is not None and need_db), rows=(lse,),
                       dloss=dloss, chunk_rows=chunk_rows, config=config)


def _finish_grads(dx, dw, db, x_shape, x_dtype, bias_dtype, scale=None):
    """The gradients in the inputs' shapes and dtypes, times the incoming scalar gradient
    ``scale`` (in place: these buffers belong to one call alone)."""
    if scale is not None:
        for t in (dx, dw, db):
            if t is not None:
                t.mul_(scale)
    if dx is not None:
        dx = dx.view(x_shape).to(x_dtype)
    if db is not None:
        db = db.to(bias_dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- autograd

class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses of (M, C) logits (fp32); the reduction happens outside, in PyTorch ops."""

    @staticmethod
    def forward(ctx, logits2, target1, ignore_index, label_smoothing):
        loss, lse = cross_entropy_fwd(logits2, target1, ignore_index, label_smoothing)
        ctx.save_for_backward(logits2, target1, lse)
        ctx.args = (ignore_index, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits2, target1, lse = ctx.saved_tensors
        return cross_entropy_bwd(dloss, logits2, target1, lse, *ctx.args), None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``cross_entropy(x @ weight.T + bias, target)``, reduced. Mean/sum: the gradients are
    computed in the forward (no logits kept) and scaled by the backward; none: the backward
    recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, reduction, compute_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        t1 = target_rows(target)
        need = ctx.needs_input_grad
        ctx.need = (need[0], need[1], bias is not None and need[3])
        loss, lse, dx, dw, db = linear_cross_entropy_fwd(
            x2, weight, t1, bias, ignore_index, reduction, *ctx.need, compute_dtype)
        ctx.reduction, ctx.cd, ctx.ignore_index = reduction, compute_dtype, ignore_index
        ctx.x_meta = (x.shape, x.dtype, bias.dtype if bias is not None else None)
        if reduction == "none":
            ctx.save_for_backward(x2, weight, t1, bias, lse)
            return loss.view(target.shape)
        ctx.grads = (dx, dw, db)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            x2, weight, t1, bias, lse = ctx.saved_tensors
            grads = linear_cross_entropy_bwd(dloss.reshape(-1), x2, weight, t1, bias, lse,
                                             ctx.ignore_index, *ctx.need, ctx.cd)
            dx, dw, db = _finish_grads(*grads, *ctx.x_meta)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "aiter_dist.linear_cross_entropy: a second backward through the same loss "
                    "(retain_graph=True): with reduction 'mean' or 'sum' the forward computes "
                    "the gradients and the first backward hands them out; call "
                    "linear_cross_entropy again for another backward")
            grads, ctx.grads = ctx.grads, None
            dx, dw, db = _finish_grads(*grads, *ctx.x_meta, scale=dloss)
        return dx, dw, None, db, None, None, None


# ----------------------------------------------------------------------------- torch.library

@torch.library.custom_op("aiter_dist::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                          label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_entropy_fwd(logits, target, ignore_index, label_smoothing)


@_cross_entropy_fwd_op.register_fake
def _(logits, target, ignore_index, label_smoothing):
    rows = logits.shape[0]
    acc = _acc_dtype(logits)
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


@torch.library.custom_op("aiter_dist::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                          lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                          class_start: int, n_classes: int) -> torch.Tensor:
    return cross_entropy_bwd(dloss, logits, target, lse, ignore_index, label_smoothing,
                             class_start, n_classes)


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, target, lse, ignore_index, label_smoothing, class_start, n_classes):
    return logits.new_empty(logits.shape)  # contiguous, as the real output


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.args = (ignore_index, label_smoothing, 0, logits.shape[1])


def _ce_backward(ctx, dloss, dlse):
    logits, target, lse = ctx.saved_tensors
    return (torch.ops.aiter_dist.cross_entropy_bwd(dloss, logits, target, lse, *ctx.args),
            None, None, None)


torch.library.register_autograd("aiter_dist::cross_entropy_fwd", _ce_backward,
                                setup_context=_ce_setup)


@torch.library.custom_op("aiter_dist::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
        x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
        ignore_index: int, reduction: str, compute_dtype: torch.dtype, need_dx: bool,
        need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dx, dw, db): mean/sum carry the gradients of the unscaled loss (empty
    tensors where not asked for, and for reduction none)."""
    loss, lse, dx, dw, db = linear_cross_entropy_fwd(
        x.reshape(-1, x.shape[-1]), weight, target_rows(target), bias, ignore_index, reduction,
        need_dx, need_dw, need_db, compute_dtype)
    empty = x.new_empty(0)
    return (loss.view(target.shape) if reduction == "none" else loss, lse,
            dx.view(x.shape) if dx is not None else empty.clone(),
            dw if dw is not None else empty.clone(), db if db is not None else empty.clone())


@_linear_cross_entropy_op.register_fake
def _(x, weight, target, bias, ignore_index, reduction, compute_dtype, need_dx, need_dw, need_db):
    grads = reduction != "none"
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    rows = math.prod(target.shape)
    return (x.new_empty(target.shape if reduction == "none" else (), dtype=acc),
            x.new_empty(rows, dtype=acc),
            x.new_empty(x.shape, dtype=compute_dtype) if grads and need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if grads and need_dw else x.new_empty(0),
            x.new_empty(weight.shape[0], dtype=acc) if grads and need_db else x.new_empty(0))


@torch.library.custom_op("aiter_dist::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
        dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
        bias: torch.Tensor | None, lse: torch.Tensor, ignore_index: int,
        compute_dtype: torch.dtype, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of reduction none (recomputed chunk by chunk): (dx in x's shape and the compute
    dtype, dw in the weight's dtype, db fp32); empty where not asked for."""
    dx, dw, db = linear_cross_entropy_bwd(dloss.reshape(-1), x.reshape(-1, x.shape[-1]), weight,
                                          target_rows(target), bias, lse, ignore_index, need_dx,
                                          need_dw, need_db, compute_dtype)
    empty = x.new_empty(0)
    return (dx.view(x.shape) if dx is not None else empty.clone(),
            dw if dw is not None else empty.clone(), db if db is not None else empty.clone())


@_linear_cross_entropy_bwd_op.register_fake
def _(dloss, x, weight, target, bias, lse, ignore_index, compute_dtype, need_dx, need_dw,
      need_db):
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape, dtype=compute_dtype) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
            x.new_empty(weight.shape[0], dtype=acc) if need_db else x.new_empty(0))


def _lce_setup(ctx, inputs, output):
    x, weight, target, bias, ignore_index, reduction, cd, need_dx, need_dw, need_db = inputs
    loss, lse, dx, dw, db = output
    ctx.reduction, ctx.ignore_index, ctx.cd = reduction, ignore_index, cd
    ctx.need = (need_dx, need_dw, need_db)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(lse, dx, dw, db)
    if reduction == "none":
        ctx.save_for_backward(x, weight, target, bias, lse)
    else:
        ctx.save_for_backward(dx, dw, db)


def _lce_backward(ctx, dloss, *_):
    need_dx, need_dw, need_db = ctx.need
    if ctx.reduction == "none":
        x, weight, target, bias, lse = ctx.saved_tensors
        dx, dw, db = torch.ops.aiter_dist.linear_cross_entropy_bwd(
            dloss, x, weight, target, bias, lse, ctx.ignore_index, ctx.cd, need_dx, need_dw,
            need_db)
    else:
        dx, dw, db = (t * dloss for t in ctx.saved_tensors)
    return (dx.to(ctx.x_dtype) if need_dx else None, dw if need_dw else None,
            None, db.to(ctx.bias_dtype) if need_db else None, None, None, None, None, None,
            None)


torch.library.register_autograd("aiter_dist::linear_cross_entropy", _lce_backward,
                                setup_context=_lce_setup)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


# ----------------------------------------------------------------------------- functional API

def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy(logits, target, ...)`` (class indices, no class weights) in one read of
    the logits forward and one read plus one write backward.

    Args:
        logits: (N, C), (C,) or (N, C, d1, ...): float32, float16, bfloat16 or float64. (N, C)
            with contiguous classes is the fast path (rows may be strided); other layouts are
            copied to (rows, C) first (``last_path`` then ends in ``+copy``).
        target: (N,), () or (N, d1, ...) to match, int64 or int32 class ids in ``[0, C)`` or
            ``ignore_index``.
        ignore_index: targets equal to it add 0 to the loss and to the gradient, and do not
            count towards the mean.
        reduction: ``"none"`` (the target's shape), ``"mean"`` (over non-ignored targets: 0/0
            is NaN, as in PyTorch) or ``"sum"``.
        label_smoothing: e in [0, 1]: ``loss = (1 - e) * nll + e * mean_j(-log p_j)``.

    Returns:
        The loss in the logits' dtype (computed in fp32, rounded once), or float32 under
        ``torch.autocast`` (as ``F.cross_entropy`` there). Autograd: dlogits in the logits'
        dtype and layout.

    Bad targets: outside ``[0, C)`` and not ``ignore_index``, they raise on CPU; on GPU (where
    checking would cost a synchronization) such a row's loss and gradient are NaN. Paths:
    ``last_path("cross_entropy")`` (``"triton"``, ``"triton-interpreter"``, or ``"torch"`` for
    float64, empty inputs, and CPU tensors on a GPU machine).
    """
    # A reduced loss without autograd, of a signature seen before: one launch from its plan.
    key = None
    one_launch = reduction in ("mean", "sum") and not compiling()
    if one_launch:
        try:
            one_launch = not (logits.requires_grad and torch.is_grad_enabled())
            key = (*signature(logits), *signature(target), type(ignore_index), ignore_index,
                   type(label_smoothing), label_smoothing, reduction,
                   loss_dtype(logits.dtype, logits.device),
                   plan_device(logits.device))
            plan = _reduced_plans.get(key) if one_launch else None
        except (AttributeError, TypeError):  # not tensors, unhashable: the checks below
            key = plan = None
        if plan is not None and not (logits.data_ptr() | target.data_ptr()) & 15:
            return _planned_reduced(plan, logits, target)
    if _plain_ce(logits, target) and reduction in REDUCTIONS and type(ignore_index) is int \
            and type(label_smoothing) in (int, float) and 0.0 <= label_smoothing <= 1.0:
        x2, t1 = logits, target
    else:
        x2, t1 = _ce_layout(logits, target, ignore_index, reduction, label_smoothing)
    label_smoothing = float(label_smoothing)
    dtype = loss_dtype(logits.dtype, logits.device)
    if compiling():
        loss = torch.ops.aiter_dist.cross_entropy_fwd(x2, t1, ignore_index, label_smoothing)[0]
    elif one_launch and x2.numel() <= ONE_LAUNCH_MAX_LOGITS \
            and not takes_torch_path("cross_entropy", (x2,)):
        # (a plan only where the kernel reads the caller's own tensors)
        planned = key is not None and x2 is logits and t1 is target
        loss, plan = cross_entropy_reduced(x2, t1, ignore_index, label_smoothing, reduction,
                                           dtype, planned)
        if plan is not None:
            _reduced_plans[key] = plan
        _record_copy(logits)
        return loss
    else:
        if logits.requires_grad and torch.is_grad_enabled():
            loss = CrossEntropyFunction.apply(x2, t1, ignore_index, label_smoothing)
        else:
            loss = cross_entropy_fwd(x2, t1, ignore_index, label_smoothing)[0]
        _record_copy(logits)
    return _reduce(loss, t1, ignore_index, reduction, target.shape, dtype)


def _record_copy(logits):
    """Adds ``+copy`` to the path where the logits were copied to (rows, C) first."""
    if logits.dim() > 2 and not logits.movedim(1, -1).is_contiguous():
        record_path("cross_entropy", last_path("cross_entropy") + "+copy",
                    "the class dimension is not the last contiguous one: logits copied to "
                    "(rows, C) for the kernels")


def _lce_checks(op, x, weight, target, bias, ignore_index, reduction):
    check_tensor(op, "x", x, dtypes=LOGIT_DTYPES)
    check_tensor(op, "weight", weight, dtypes=LOGIT_DTYPES)
    _target_dtype_error(op, target)
    _check_common(op, target, ignore_index, reduction)
    check_same_device(op, x=x, weight=weight, target=target, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"aiter_dist.{op}: weight must be (vocab, {x.shape[-1]}) to match x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"aiter_dist.{op}: weight {tuple(weight.shape)} has no classes")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"aiter_dist.{op}: target shape {tuple(target.shape)} must be x's "
                         f"leading dims {tuple(x.shape[:-1])}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=LOGIT_DTYPES)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"aiter_dist.{op}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if not compiling():
        _check_target_values(op, target, weight.shape[0], ignore_index)


def linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, reduction="mean"):
    """``cross_entropy(x @ weight.T + bias, target)`` without the (tokens, vocab) logits.

    Args:
        x: (..., H), float32 / float16 / bfloat16 / float64; tokens are the flattened leading
            dims.
        weight: (V, H), the output projection (nn.Linear layout), any of those dtypes: an fp32
            weight with 16-bit ``x`` is the mixed-precision layout.
        target: x's leading dims, int64 / int32 class ids in ``[0, V)`` or ``ignore_index``.
        bias: (V,) or None.
        ignore_index, reduction: as :func:`cross_entropy` (no label smoothing here).

    Returns:
        The loss in x's dtype, or float32 under ``torch.autocast`` (as ``F.cross_entropy``
        there). The GEMMs run in the compute dtype, x's or autocast's (weight and bias cast to
        it), the softmax in fp32.

    Memory and time: tokens go in chunks (``lce_chunk_rows``); per chunk, one GEMM makes the
    logits, one kernel writes their loss and overwrites them with their gradient, and the
    chunk's dx rows and dweight share follow at once. With reduction mean/sum the gradients are
    therefore computed in the forward (no logits survive it) and the backward only scales them
    (so a second backward through one loss raises); reduction none recomputes the logits in the
    backward. dweight accumulates chunk by chunk in the weight's dtype: an fp32 weight in fp32,
    a bf16 weight in bf16 (as Liger-Kernel does: each chunk's sum is rounded into it). dbias
    accumulates in fp32. dx is returned in x's dtype.
    """
    op = "linear_cross_entropy"
    _lce_checks(op, x, weight, target, bias, ignore_index, reduction)
    cd = torch.get_autocast_dtype(x.device.type) if x.device.type in ("cuda", "cpu") and \
        torch.is_autocast_enabled(x.device.type) else x.dtype
    out_dtype = loss_dtype(x.dtype, x.device)
    if compiling():
        need = [torch.is_grad_enabled() and t is not None and t.requires_grad
                for t in (x, weight, bias)]
        return torch.ops.aiter_dist.linear_cross_entropy(x, weight, target, bias, ignore_index,
                                                         reduction, cd, *need)[0].to(out_dtype)
    if _needs_grad(x, weight, bias):
        return LinearCrossEntropyFunction.apply(x, weight, target, bias, ignore_index, reduction,
                                                cd).to(out_dtype)
    loss = linear_cross_entropy_fwd(x.reshape(-1, x.shape[-1]), weight, target_rows(target), bias,
                                    ignore_index, reduction, compute_dtype=cd)[0]
    return (loss.view(target.shape) if reduction == "none" else loss).to(out_dtype)


__all__ = ["cross_entropy", "linear_cross_entropy", "cross_entropy_ref",
           "linear_cross_entropy_ref", "cross_entropy_fwd", "cross_entropy_bwd",
           "linear_cross_entropy_fwd", "linear_cross_entropy_bwd", "CrossEntropyFunction",
           "LinearCrossEntropyFunction", "ce_config", "lce_chunk_rows"]
