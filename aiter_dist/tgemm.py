"""``tgemm.mm``: the one GEMM entry point of the library, ``input @ weight.T + bias``.

Every linear layer of aiter_dist calls this, so a tuned kernel added later serves all of them.
Today every shape goes to ``torch.nn.functional.linear`` (cuBLAS / hipBLASLt / MKL); the chosen
backend is recorded (``aiter_dist.last_path("tgemm.mm")``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels._runtime import FLOAT_DTYPES, check_same_device, check_tensor, record_path


def _check(input, weight, bias, otype):
    op = "tgemm.mm"
    check_tensor(op, "input", input)
    check_tensor(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"aiter_dist.{op}: weight must be 2-D (out_features, in_features), "
                         f"got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"aiter_dist.{op}: input's last dimension {input.shape[-1]} must equal "
                         f"weight's in_features {weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)}, computing input @ weight.T)")
    check_same_device(op, input=input, weight=weight, bias=bias)
    if bias is not None:
        check_tensor(op, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"aiter_dist.{op}: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if otype is not None and otype not in FLOAT_DTYPES:
        raise TypeError(f"aiter_dist.{op}: otype must be one of float32, float16, bfloat16, "
                        f"got {otype}")
    autocast = torch.is_autocast_enabled(input.device.type) if input.device.type in (
        "cuda", "cpu") else False
    if input.dtype != weight.dtype and not autocast:
        raise TypeError(f"aiter_dist.{op}: input dtype {input.dtype} differs from weight dtype "
                        f"{weight.dtype}; cast one of them (or run under torch.autocast)")


def _select_backend(input: torch.Tensor, weight: torch.Tensor) -> str:
    """The dispatch point: which GEMM serves this (shape, dtype, device)."""
    return "torch.linear"


def mm(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
       otype: torch.dtype | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` (weight in ``nn.Linear`` layout), autograd-aware.

    ``otype`` casts the result (default: the input's dtype, or autocast's).
    """
    _check(input, weight, bias, otype)
    backend = _select_backend(input, weight)
    record_path("tgemm.mm", backend)
    out = F.linear(input, weight, bias)
    return out if otype is None or out.dtype == otype else out.to(otype)
