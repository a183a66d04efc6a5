"""``init_distributed()``: one call that works under torchrun, under mpirun/mpiexec, and as a
single plain process; ``init_parallel_mesh()``: the (dp, tp) layout for many nodes, tensor
parallel inside a node and data parallel across nodes."""
from __future__ import annotations

import atexit
import datetime
import gc
import os
import platform
import socket
import threading
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from .kernels._runtime import log

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


def _busy_threads() -> int | None:
    """Threads of this process, other than the caller, that run or sit in a timed futex wait
    (where CPython's ``take_gil`` waits); None where /proc cannot tell."""
    futex = {"x86_64": "202", "aarch64": "98"}.get(platform.machine())
    me = threading.get_native_id()
    busy = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == me:
                continue
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/self/task/{tid}/syscall") as f:
                    call = f.read().split()
            except OSError:
                continue  # the thread just ended
            timed_futex = futex is not None and call[:1] == [futex] and len(call) > 4 \
                and int(call[4], 16) != 0
            busy += state == "R" or timed_futex
    except OSError:
        return None
    return busy


def _quiesce(limit_s: float = 2.0) -> None:
    """Sleep, without the GIL, until no other thread of the process wants to run: a thread that
    still has to take the GIL gets it now, while the interpreter is alive."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        busy = _busy_threads()
        if busy is None:  # no /proc: a fixed grace period
            time.sleep(0.2)
            return
        quiet = quiet + 1 if busy == 0 else 0
        time.sleep(0.002)


def shutdown() -> None:
    """Tear down what ``init_distributed`` set up, before the interpreter finalizes: drop every
    aiter_dist workspace, destroy the process groups, collect the garbage that still refers to
    them, and let every native thread settle. Safe to call more than once; registered with
    ``atexit`` by :func:`init_distributed`.

    Why: gloo runs each collective on a worker thread, which frees the finished work (and the
    tensors it holds) only after the caller has moved on. If Python has dropped such a tensor by
    then, freeing it means taking the GIL; a worker that gets there after the interpreter began
    to finalize is ended by CPython, and its unwinding through a C++ destructor calls
    ``std::terminate`` ("terminate called without an active exception", exit -6). On a loaded
    machine a worker can wait that long to be scheduled. ``destroy_process_group()`` does not
    join the workers (only the group's destructor does, when the last reference to it dies, and
    importing ``torch._inductor`` keeps one), so this waits instead until no thread is left
    wanting to run.
    """
    from .comm import release_workspaces

    release_workspaces()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups nobody holds any more: their destructors join the workers now
    _quiesce()


_shutdown_registered = False


def init_distributed(timeout_s: float | None = None):
    """Initialize torch.distributed for this process and return the default process group.

    * under torchrun (``RANK``/``WORLD_SIZE`` set): the usual env:// rendezvous;
    * under mpirun/mpiexec: rank and size from mpi4py, the rendezvous address broadcast over MPI;
    * otherwise: a single-process group of size 1.

    Picks NCCL for CUDA tensors (RCCL on ROCm) and gloo for CPU tensors, and sets this process's
    CUDA device to its local rank. Calling it again returns the existing group. Registers
    :func:`shutdown` to run at exit (the script need not destroy the group itself).
    """
    global _shutdown_registered
    if dist.is_initialized():
        return dist.group.WORLD
    if not _shutdown_registered:
        atexit.register(shutdown)
        _shutdown_registered = True
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


class ParallelMesh(NamedTuple):
    """The 2-D layout of :func:`init_parallel_mesh`: rank = dp_rank * tp + tp_rank, so the ``tp``
    consecutive ranks of one data-parallel replica share a host (torchrun and SLURM number the
    ranks of a node consecutively)."""
    mesh: object  # torch DeviceMesh of shape (dp, tp), dims named ("dp", "tp"); None when dp == 1
    tp_group: object  # this rank's tensor-parallel group (the world when dp == 1)
    dp_group: object  # this rank's data-parallel group (ranks with its tp_rank); None when dp == 1
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    ranks_per_host: int  # ranks sharing this rank's host (what ``tp=None`` picks)


def init_parallel_mesh(tp: int | None = None, device_type: str | None = None) -> ParallelMesh:
    """Split the world into ``dp = world / tp`` data-parallel replicas of ``tp`` tensor-parallel
    ranks each: tensor parallelism inside a node (peer-to-peer memory, NVLink), data parallelism
    across nodes (FSDP2 or DDP over ``mesh["dp"]``). Collective: every rank calls it, after
    :func:`init_distributed`.

    Args:
        tp: ranks per tensor-parallel group; default the ranks on this rank's host (hosts as
            ``aiter_dist``'s workspace sees them: ``AITER_DIST_HOSTNAME``, else the hostname).
            Must divide the world size. A tp group whose ranks span hosts is allowed, but its
            collectives then take torch.distributed (logged once per op, ``last_path``).
        device_type: the mesh's device type; default ``"cuda"`` with a GPU, else ``"cpu"``.

    With ``dp == 1`` no mesh is built and the world is the tensor-parallel group (one node, as
    before). Without torch.distributed: a one-rank layout with no groups.
    """
    from .comm.workspace import host_name

    if not dist.is_initialized():
        return ParallelMesh(None, None, None, 1, 1, 0, 0, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts = [None] * world
    dist.all_gather_object(hosts, host_name())
    per_host = hosts.count(hosts[rank])
    tp = per_host if tp is None else int(tp)
    if tp < 1 or world % tp:
        raise ValueError(f"aiter_dist.init_parallel_mesh: tp={tp} does not divide the world size "
                         f"{world}; pick a tensor-parallel size that does (the ranks per node, "
                         f"{per_host} here, or a divisor of it)")
    dp = world // tp
    spans = sorted({i for i in range(dp) if len(set(hosts[i * tp:(i + 1) * tp])) > 1})
    if spans and rank == 0:
        log.warning("aiter_dist.init_parallel_mesh: tp=%d puts tensor-parallel group(s) %s on "
                    "more than one host (%d ranks per host here): their collectives take "
                    "torch.distributed, not the peer-to-peer kernels; use tp <= the ranks per "
                    "node with ranks numbered node by node", tp, spans, per_host)
    if dp == 1:
        return ParallelMesh(None, dist.group.WORLD, None, tp, 1, rank, 0, per_host)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    return ParallelMesh(mesh, mesh["tp"].get_group(), mesh["dp"].get_group(), tp, dp,
                        rank % tp, rank // tp, per_host)


def local_device() -> torch.device:
    """The device this process computes on: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
