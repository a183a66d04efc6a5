"""``tgemm.mm``: the one GEMM entry point of the library, ``input @ weight.T + bias``.

Every linear layer of aiter_dist calls this. Per shape class (``kernels/gemm.py``:
``shape_class``) it runs whichever of our Triton GEMM and the vendor's (cuBLAS / hipBLASLt
through ``F.linear``) the tuned table (``kernels/gemm_tuned.py``, measured on the GPU) found
faster; a class the table has not measured takes the vendor's, and CPU tensors take ``F.linear``
(the interpreter is too slow for training). The choice is recorded:
``aiter_dist.last_path("tgemm.mm")`` (and ``"tgemm.mm.dgrad"`` / ``"tgemm.mm.wgrad"`` for the
backward passes when our kernel serves any of them).

``backend="triton"`` (or ``tgemm.default_backend = "triton"`` for every call, the layers' too)
forces our kernel, ``"vendor"`` the vendor's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels._runtime import FLOAT_DTYPES, compiling, plan_cache, record_path, signature
from .kernels.gemm import (_autocast_dtype, apply_linear, autocast_inputs, check_linear_inputs,
                           compute_dtype, linear_backends)

default_backend = "auto"  # "auto" | "triton" | "vendor": the backend of calls that name none


def _check(input, weight, bias, otype):
    op = "tgemm.mm"
    check_linear_inputs(op, input, weight, bias)
    if otype is not None and otype not in FLOAT_DTYPES:
        raise TypeError(f"aiter_dist.{op}: otype must be one of float32, float16, bfloat16, "
                        f"got {otype}")


def mm(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
       otype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``input @ weight.T + bias`` (weight in ``nn.Linear`` layout), autograd-aware.

    ``otype`` casts the result (default: the input's dtype, or autocast's). ``backend``:
    ``"auto"`` (the tuned table), ``"triton"`` or ``"vendor"``; default ``default_backend``.
    """
    op = "tgemm.mm"
    backend = default_backend if backend is None else backend
    try:  # inputs of a signature seen before passed the checks; their backends are known
        key = (*signature(input), *signature(weight),
               None if bias is None else signature(bias), otype, backend)
        backends = _known.get(key)
    except (AttributeError, TypeError):
        key = backends = None
    if backends is None or compiling() or _autocast_dtype(input) is not None:
        _check(input, weight, bias, otype)
        backends = linear_backends(op, math.prod(input.shape[:-1]), weight.shape[0],
                                   weight.shape[1], compute_dtype(input), input.device, backend,
                                   prefer="vendor")
        if key is not None and not compiling() and _autocast_dtype(input) is None:
            _known[key] = backends
    if backends == ("vendor",) * 3:
        record_path(op, "torch.linear")
        out = F.linear(input, weight, bias)
    else:
        out = apply_linear(*autocast_inputs(input, weight, bias), backends, op)
    return out if otype is None or out.dtype == otype else out.to(otype)


# (input, weight, bias signatures, otype, backend) -> the (forward, dgrad, wgrad) backends.
_known = plan_cache()

