"""Single-device Triton kernels, one file per family (installed as ``aiter_dist.kernels``).

Importing this package first decides whether Triton runs compiled or through its interpreter
(no GPU present, and ``TRITON_INTERPRET`` unset by the user): see ``_runtime``.
"""
from ._runtime import INTERPRETED, last_path  # noqa: F401  (first: sets TRITON_INTERPRET)
from .rmsnorm import add_rms_norm, rms_norm  # noqa: F401
