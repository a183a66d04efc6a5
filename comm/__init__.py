"""Collectives over the symmetric workspace (installed as ``aiter_dist.comm``)."""
from .all_reduce import (AllReduceFunc, all_reduce, all_reduce_raw,  # noqa: F401
                         copy_to_parallel_region, custom_all_reduce_raw)
from .fused_norm import (all_reduce_add_rms_norm, all_reduce_add_rms_norm_fp8,  # noqa: F401
                         reduce_scatter_add_rms_norm, rms_norm_all_gather)
from .protocol import check_comm_errors  # noqa: F401
from .gather_scatter import all_gather, reduce_scatter  # noqa: F401
from .dist_gemm import all_gather_gemm, gemm_reduce_scatter  # noqa: F401
from .tensor_parallel import gather_last_dim, split_last_dim  # noqa: F401
from .workspace import (SymmetricWorkspace, create_workspace, find_workspace,  # noqa: F401
                        get_workspace, release_workspaces, workspace_tensor)


def check_errors(group=None, device=None) -> None:
    """Raise if a custom collective of ``group`` has reported a missing or mismatched rank.

    On GPU, kernels report into host memory as they finish; call this after a synchronize to learn
    of a failure before the next collective would raise it.
    """
    ws = find_workspace(group, device)
    if ws is not None:
        check_comm_errors(ws)
