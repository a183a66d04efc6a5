"""``RMSNorm`` module over ``aiter_dist.rms_norm``."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.rmsnorm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned scale (Triton forward and backward).

    ``forward(x)`` returns the normalized tensor; ``forward(x, residual)`` fuses the residual add
    and returns ``(out, x + residual)``.
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
