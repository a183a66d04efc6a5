"""aiter_dist: distributed training and communication kernels for PyTorch, in Triton.

Importing it on a machine with no GPU turns on Triton's interpreter (unless ``TRITON_INTERPRET`` is
already set), so every op also runs on CPU tensors.
"""
from .kernels import INTERPRETED, last_path  # noqa: F401  (first: picks compiled or interpreted)
from .kernels.flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
from .kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: F401
from .kernels.rope import apply_rotary_emb, apply_rotary_emb_qk  # noqa: F401
from .kernels.swiglu import swiglu  # noqa: F401
from .kernels.gemm import linear  # noqa: F401
from .kernels.conv import conv2d  # noqa: F401
from .kernels.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: F401
from .comm.vocab_parallel import vocab_parallel_cross_entropy  # noqa: F401
from .kernels.gemm_fp8 import (gemm_a8w8, gemm_a8w8_blockscale,  # noqa: F401
                               quantize_per_block_fp8, quantize_per_token_fp8)
from .comm import (all_gather, all_reduce, all_reduce_add_rms_norm,  # noqa: F401
                   all_reduce_add_rms_norm_fp8, check_errors, create_workspace, get_workspace,
                   reduce_scatter, reduce_scatter_add_rms_norm, rms_norm_all_gather,
                   workspace_tensor)
from .comm.dist_gemm import all_gather_gemm, gemm_reduce_scatter  # noqa: F401
from .comm.ddp_hook import ddp_comm_hook  # noqa: F401
from . import checkpoint, nn, tgemm  # noqa: F401
from .distributed import init_distributed, local_device, shutdown  # noqa: F401
from .parallel import parallelize  # noqa: F401

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "rms_norm", "add_rms_norm", "linear",
           "apply_rotary_emb", "apply_rotary_emb_qk", "swiglu",
           "gemm_a8w8", "gemm_a8w8_blockscale", "quantize_per_token_fp8", "quantize_per_block_fp8",
           "all_reduce", "all_gather", "reduce_scatter", "all_reduce_add_rms_norm",
           "all_reduce_add_rms_norm_fp8",
           "reduce_scatter_add_rms_norm", "rms_norm_all_gather", "workspace_tensor",
           "tgemm", "nn", "parallelize", "init_distributed", "local_device", "shutdown", "last_path",
           "get_workspace", "create_workspace", "check_errors", "INTERPRETED", "cross_entropy",
           "linear_cross_entropy", "vocab_parallel_cross_entropy", "checkpoint",
           "all_gather_gemm", "gemm_reduce_scatter", "ddp_comm_hook", "conv2d"]
