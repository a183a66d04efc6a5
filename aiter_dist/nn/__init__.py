"""Tensor-parallel modules: thin wrappers over the functional ops."""
from .attention import ParallelAttention  # noqa: F401
from .conv import Conv2d  # noqa: F401
from .batchnorm import SyncBatchNorm  # noqa: F401
from .linear import ColumnParallelLinear, RowParallelLinear  # noqa: F401
from .norm import RMSNorm  # noqa: F401
