"""``RMSNorm`` module over ``aiter_dist.rms_norm``."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.rmsnorm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned scale ``weight`` (initialized to ones):
    ``x * rsqrt(mean(x**2, dim=-1) + eps) * weight``, forward and backward in Triton.

    ``forward(x)`` is :func:`aiter_dist.rms_norm` and returns the normalized tensor;
    ``forward(x, residual)`` is :func:`aiter_dist.add_rms_norm`, which fuses the residual add and
    returns ``(out, x + residual)``. ``x`` (and ``residual``, same shape and dtype) is
    ``(..., hidden_size)`` in float32, float16, bfloat16 or float64; outputs take x's dtype,
    ``weight`` may be stored in another (fp32 master weights). Not a collective: in tensor
    parallelism every rank holds the whole weight. Gradients reach ``x`` (and ``residual``, the
    same) and ``weight``; numerics and paths as the functional ops (deterministic on the kernel
    paths, float64 and zero-size inputs through PyTorch).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
