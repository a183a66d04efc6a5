"""``init_distributed()``: one call that works under torchrun, under mpirun/mpiexec, and as a
single plain process."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _under_mpi() -> bool:
    return any(v in os.environ for v in _MPI_RANK_VARS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _backend() -> str:
    # Device-specific backends: CUDA/ROCm tensors go through NCCL (RCCL on ROCm builds, which
    # torch also calls "nccl"), CPU tensors through gloo, so CPU tensors work on GPU machines too.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _rank_info_from_mpi():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr = None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        addr = f"tcp://{host}:{os.environ.get('MASTER_PORT') or _free_port()}"
    addr = comm.bcast(addr, root=0)
    return rank, world, local_rank, addr


def init_distributed(timeout_s: float | None = None):
    """Initialize torch.distributed for this process and return the default process group.

    * under torchrun (``RANK``/``WORLD_SIZE`` set): the usual env:// rendezvous;
    * under mpirun/mpiexec: rank and size from mpi4py, the rendezvous address broadcast over MPI;
    * otherwise: a single-process group of size 1.

    Picks NCCL for CUDA tensors (RCCL on ROCm) and gloo for CPU tensors, and sets this process's
    CUDA device to its local rank. Calling it again returns the existing group.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get(
        "AITER_DIST_INIT_TIMEOUT_S", "600")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        init_method = "env://"
    elif _under_mpi():
        rank, world, local_rank, init_method = _rank_info_from_mpi()
    else:
        rank, world, local_rank = 0, 1, 0
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(_backend(), init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout)
    return dist.group.WORLD


def local_device() -> torch.device:
    """The device this process computes on: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
