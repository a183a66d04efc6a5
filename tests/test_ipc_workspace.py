"""The IPC workspace backend (``AITER_DIST_WORKSPACE_BACKEND=ipc``): device buffers shared
through CUDA/HIP IPC handles. Unlike torch symmetric memory it accepts two ranks on one GPU, so
this runs the collective kernels between two processes on a single GPU (their kernels
time-slice the device: slow, but every barrier, header check and peer read is real).

The process group is gloo: NCCL refuses two ranks on one device. GPU tier (one GPU)."""
import time

import pytest
import torch

import aiter_dist
from aiter_dist.testing import run_distributed

IPC = {"AITER_DIST_WORKSPACE_BACKEND": "ipc", "AITER_DIST_COMM_TIMEOUT_S": "120"}


def _ipc_ops(rank, world):
    from aiter_dist.comm import get_workspace

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    t0 = time.time()
    ws = get_workspace(device=dev)
    assert ws.backend == "ipc"
    x = (torch.arange(5000) % 7 + rank).to(device=dev, dtype=torch.bfloat16)
    want = (torch.arange(5000) % 7 * world + sum(range(world))).to(torch.bfloat16)
    for algo in ("one_shot", "two_shot"):
        assert torch.equal(aiter_dist.all_reduce(x, algo=algo).cpu(), want), algo
    g = aiter_dist.all_gather(torch.full((3, 5), float(rank), device=dev), algo="one_shot")
    assert torch.equal(g.cpu(), torch.cat([torch.full((3, 5), float(r)) for r in range(world)]))
    rs = aiter_dist.reduce_scatter(torch.ones(world * 4, device=dev), algo="one_shot")
    assert torch.equal(rs.cpu(), torch.full((4,), float(world)))
    rows = torch.ones(world * 2, 64, device=dev)
    out, res = aiter_dist.all_reduce_add_rms_norm(rows, torch.zeros_like(rows),
                                                  torch.ones(64, device=dev), algo="one_shot")
    assert torch.equal(res.cpu(), torch.full((world * 2, 64), float(world)))
    torch.testing.assert_close(out.cpu(), torch.ones(world * 2, 64))
    # A mismatch is still caught between processes on one GPU.
    with pytest.raises(RuntimeError, match=r"launched (a different message|all_reduce of 10\d)"):
        aiter_dist.all_reduce(torch.ones(100 + rank, device=dev), algo="one_shot")
        torch.cuda.synchronize()
        aiter_dist.check_errors()
    return time.time() - t0


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_over_ipc():
    seconds = run_distributed(_ipc_ops, 2, backend="gloo", env=IPC, timeout=600)
    print(f"ipc on one GPU, 2 ranks: {max(seconds):.1f} s for 7 collectives and a mismatch")


def _symm_mem_two_ranks_one_gpu(rank, world):
    torch.cuda.set_device(0)
    with pytest.raises(RuntimeError, match="AITER_DIST_WORKSPACE_BACKEND=ipc"):
        aiter_dist.get_workspace(device="cuda:0")
    return True


@pytest.mark.gpu
def test_symm_mem_refuses_two_ranks_on_one_gpu_with_a_pointer_to_ipc():
    run_distributed(_symm_mem_two_ranks_one_gpu, 2, backend="gloo",
                    env={"AITER_DIST_WORKSPACE_BACKEND": "symm_mem"}, timeout=300)
