"""``SyncBatchNorm``: batch normalization whose statistics span a process group, reduced by
aiter_dist's all-reduce.

Semantics are ``torch.nn.SyncBatchNorm``'s (same constructor, buffers, state dict, momentum and
``num_batches_tracked`` rules, per-rank weight and bias gradients that DDP then averages); what
differs is the communication and where it runs:

* forward (training, group of more than one rank): ONE all-reduce of ``[C sums, C sums of
  squares, count]`` (fp32; sums of ``x - shift`` with ``shift`` the running mean, which every
  rank holds alike, so a large mean does not cancel the variance). torch's gathers every rank's
  mean and inverse std instead. Ranks may hold different batch sizes, including none.
* backward: ONE all-reduce of ``[C sums of dy, C sums of dy * (x - mean)]``, only when the input
  needs a gradient (as torch).
* CPU ranks work (torch's raises unless the tensor is on a GPU): the collectives take the
  ``/dev/shm`` workspace or gloo by their own routing (``aiter_dist.last_path("all_reduce")``).

Per-device arithmetic: on CUDA (and ROCm) the local reductions and the input gradient are torch's
fused batch-norm primitives (``batch_norm_stats``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``: one pass each, channels_last aware, the ones torch's SyncBatchNorm
calls); on other devices, fp32 PyTorch composites of the same formulas. The normalization itself
is ``F.batch_norm`` in inference form with the global mean and variance: one fused pass on every
device. float64 inputs keep float64 statistics and all-reduce them through torch.distributed
(aiter_dist's collectives take fp32/fp16/bf16), recorded as a fallback.

Eval mode with running statistics, and a group of one rank, are plain ``F.batch_norm`` (no
communication), as torch's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm.all_reduce import all_reduce
from ..kernels._runtime import last_path, record_path

OP = "sync_batch_norm"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``x`` (N, C, ...)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _layout(x: torch.Tensor) -> torch.Tensor:
    # channels_last stays as it is (the fused CUDA primitives and F.batch_norm take it); any
    # other striding becomes contiguous once, here, not in every op below.
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or \
            x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s memory format (the fused CUDA kernels read both in one layout)."""
    if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last_3d):
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def _all_reduce_stats(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` (a small fp32 or fp64 vector) over ``group``; returns a new tensor."""
    if t.dtype == torch.float64:
        record_path(OP, "torch.distributed",
                    "float64 statistics: aiter_dist's collectives take fp32/fp16/bf16")
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out
    out = all_reduce(t, group)
    record_path(OP, f"sync:{last_path('all_reduce')}")
    return out


def _local_moments(x: torch.Tensor, acc: torch.dtype, n: int):
    """This rank's per-channel mean and biased variance in ``acc`` (zeros for an empty input)."""
    c = x.shape[1]
    if n == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return z, z
    if x.is_cuda and acc == torch.float32:
        # One fused pass (Welford per channel, fp32 for any input dtype). eps=0 returns
        # 1/sqrt(var), and 0 (or inf) for a constant channel: both map back to var = 0.
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        var = torch.where(invstd > 0, invstd.reciprocal().square(), torch.zeros_like(invstd))
        return mean, var
    var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
    return mean, var


class SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized batch norm in training mode over ``group`` (more than one rank).

    forward(x, weight, bias, running_mean, running_var, eps, momentum, group):
        x: (N, C, *) float32/float16/bfloat16/float64, this rank's part of the batch (N may differ
            between ranks, and be 0); weight, bias: (C,) or None; running_mean, running_var: (C,)
            buffers updated in place (with the unbiased global variance) or None; momentum: the
            factor of the new statistics in the running average. Returns y like x (x's dtype and
            memory format): ``(x - mean) / sqrt(var + eps) * weight + bias`` with the mean and
            biased variance of the whole group's batch.
    backward: dx from the group's sums of dy and dy * (x - mean); dweight and dbias are this
        rank's own sums (the data-parallel reduce of parameter gradients averages them, as for
        torch.nn.SyncBatchNorm).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        x = _layout(x)
        c = x.shape[1]
        n = x.numel() // c if c else 0
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean_r, var_r = _local_moments(x, acc, n)
        # Shifted sums: every rank subtracts the same shift (the running mean, kept equal on all
        # ranks by the same updates), so sum of squares - sum^2 / N does not cancel for a mean
        # far from 0.
        shift = running_mean.detach().to(acc) if running_mean is not None else None
        d_r = mean_r - shift if shift is not None else mean_r
        stats = torch.cat([d_r * n, (var_r + d_r * d_r) * n,
                           torch.full((1,), float(n), dtype=acc, device=x.device)])
        total = _all_reduce_stats(stats, group)
        s1, s2, count = total[:c], total[c:2 * c], total[2 * c:]
        d = s1 / count.clamp_min(1)
        mean = d + shift if shift is not None else d
        var = (s2 / count.clamp_min(1) - d * d).clamp_min(0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
        if running_var is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)
                running_var.mul_(1 - momentum).add_((unbiased * momentum).to(running_var.dtype))
        invstd = torch.rsqrt(var + eps)
        # Autocast must not recast the fp32 statistics of a bf16 input; the formula and its
        # dtypes are fixed here.
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = _like(dy, x)
        c = x.shape[1]
        fused = x.is_cuda and mean.dtype == torch.float32 and x.numel() > 0
        w_acc = weight.to(mean.dtype) if weight is not None else None
        if x.numel() == 0:
            sum_dy = sum_dy_xmu = torch.zeros(c, dtype=mean.dtype, device=x.device)
        elif fused:
            sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, w_acc, True, False, False)
        else:
            dims = _reduce_dims(x)
            dyf = dy.to(mean.dtype)
            sum_dy = dyf.sum(dims)
            sum_dy_xmu = (dyf * (x.to(mean.dtype) - _bcast(mean, x))).sum(dims)
        dweight = (sum_dy_xmu * invstd).to(weight.dtype) if need_w and weight is not None else None
        dbias = sum_dy.to(weight.dtype) if need_b and weight is not None else None
        dx = None
        if need_x:
            total = _all_reduce_stats(torch.cat([sum_dy, sum_dy_xmu]), ctx.group)
            g_dy, g_dy_xmu = total[:c], total[c:]
            if x.numel() == 0:
                dx = torch.zeros_like(x)
            elif fused:
                dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w_acc, g_dy, g_dy_xmu,
                                                     count.to(torch.int32))
            else:
                # dx = w * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x-mean)))
                inv_n = count.reciprocal()
                k = invstd * w_acc if w_acc is not None else invstd
                xmu = x.to(mean.dtype) - _bcast(mean, x)
                dx = ((dy.to(mean.dtype) - _bcast(g_dy * inv_n, x)
                       - xmu * _bcast(invstd * invstd * g_dy_xmu * inv_n, x))
                      * _bcast(k, x)).to(x.dtype)
        return dx, dweight, dbias, None, None, None, None, None


# A subclass of _BatchNorm, not of torch.nn.SyncBatchNorm: DDP refuses CPU modules that hold the
# latter, and CPU ranks are a use this layer serves.
class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization over (N, C, *) inputs with statistics over the whole process group.

    Args (``torch.nn.SyncBatchNorm``'s):
        num_features: C, the channel count of the input's dimension 1.
        eps: added to the variance before the square root.
        momentum: weight of the new batch's statistics in the running averages; None: the
            cumulative average over ``num_batches_tracked`` batches.
        affine: learn a per-channel ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep ``running_mean`` / ``running_var`` (and use them in eval mode);
            False: batch statistics in eval mode too.
        process_group: the group the statistics span (default: the world).

    ``forward(x)``: x is (N, C, *) float32, float16, bfloat16 or float64 with C == num_features,
    N may differ between ranks (0 allowed); returns y of x's shape, dtype and memory format.
    Training mode in a group of more than one rank takes :class:`SyncBatchNormFunction` (one
    all-reduce forward, one backward; ``aiter_dist.last_path("sync_batch_norm")`` is
    ``"sync:<all-reduce path>"``); eval mode with running statistics, a group of one and a
    process without torch.distributed are ``F.batch_norm`` (``"local"``). Every rank of the group
    must call forward (and backward) together, as for any collective.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        self._check(x)

    def _check(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"aiter_dist.{OP}: input must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"aiter_dist.{OP}: input must be (N, C, ...) with at least 2 "
                             f"dimensions, got shape {tuple(x.shape)}; add a batch dimension "
                             f"(x.unsqueeze(0)) for a single sample")
        if x.shape[1] != self.num_features:
            raise ValueError(f"aiter_dist.{OP}: input has {x.shape[1]} channels (dimension 1 of "
                             f"shape {tuple(x.shape)}) but the layer was built for "
                             f"num_features={self.num_features}; channels must be dimension 1 "
                             f"(permute channels-last data to (N, C, ...), or build the layer "
                             f"with num_features={x.shape[1]})")
        if x.dtype not in _DTYPES:
            raise TypeError(f"aiter_dist.{OP}: input has dtype {x.dtype}; supported: float32, "
                            f"float16, bfloat16, float64")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        group = None
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) == 1:
                group = None
        if group is None:
            record_path(OP, "local")
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias,
                                batch_stats, factor, self.eps)
        return SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var,
                                           self.eps, factor, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
        torch's SyncBatchNorm) replaced by this class, parameters and buffers carried over
        (shared, not copied)."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
