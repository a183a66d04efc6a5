"""The symmetric workspace: one buffer of the same size on every rank of a group, every rank
knowing every peer's address, and the host-side state that keeps a group's ranks in agreement.

Each rank's symmetric allocation is laid out as ``[signal area | launch header | data]``. Kernels
receive two int64 tables valid in the calling process, ``signal_ptrs[world]`` (start of each
rank's allocation) and ``buffer_ptrs[world]`` (its launch header; data follows ``HEADER_BYTES``
later), and never learn which backend made them:

* ``symm_mem`` (GPU default): ``torch.distributed._symmetric_memory`` (multicast stays off);
* ``ipc`` (GPU, ``AITER_DIST_WORKSPACE_BACKEND=ipc``): a device buffer shared through CUDA/HIP IPC
  memory handles, as vLLM's and AITER's custom all-reduce do. Unlike symmetric memory it accepts
  several ranks on one GPU (their kernels then time-slice the device);
* ``shm`` (CPU): one ``/dev/shm`` file per rank mapped by every rank, so Triton's interpreter runs
  the same kernels with real cross-process loads, stores and atomics.

The signal area holds int32 counters ``[channel][program][source rank]``, then this rank's epochs
``[channel][program]``, then a poison word and a record lock: the first error any kernel of the
workspace reports takes the lock, fills the error record, and sets the poison word here and in
every peer's area; every wait on a poisoned workspace gives up at once. Counters only grow: a sender adds 1 in every peer's area, a receiver waits until every
peer's counter in its own area reaches its next epoch, then records that epoch.

Per group (whatever the device) there is also a host control block, a small ``/dev/shm`` file
every rank maps: each rank's pid (so a waiting rank learns at once that a peer exited), the
number of collective calls it has made, and the description of its latest calls that went to
torch.distributed. It is how ranks agree on the path of every call: see ``policy.py``.

Nothing outlives the processes: every rank unlinks every file of the group as soon as all ranks
have mapped them (or on error), and files of process groups whose creator died are swept when a
new group starts.
"""
from __future__ import annotations

import ctypes
import glob
import math
import mmap
import os
import re
import socket
import threading
import time
import uuid
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist

from ..kernels._runtime import cdiv, clear_plans

MAX_WORLD = 8
SIGNAL_CHANNELS = 2
HEADER_WORDS = 8  # int64 words of a launch header (see protocol.Header)
HEADER_BYTES = 256  # per-rank launch header block; data starts after it
DEFAULT_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}
BACKENDS = ("symm_mem", "ipc")

# Error record: host-readable int64 words written by kernels (pinned host memory on GPU), and
# the abort word the host sets for kernels to read. The first error of a workspace wins.
ERR_CODE, ERR_OP, ERR_PEER, ERR_PROGRAM = 0, 1, 2, 3
ERR_PEER_HEADER = 4  # HEADER_WORDS words: the peer's launch header (mismatch)
ERR_MY_HEADER = ERR_PEER_HEADER + HEADER_WORDS  # this rank's
ERR_ABORT, ERR_ABORT_RANK = 20, 21  # set by the host: 1 the CPU deadline passed, 2 a peer exited
ERR_FIELDS = 24
ERR_NONE, ERR_TIMEOUT, ERR_MISMATCH, ERR_PEER_EXITED, ERR_PEER_FAILED = 0, 1, 2, 3, 4
ABORT_DEADLINE, ABORT_PEER_EXITED = 1, 2

_SHM_PREFIX = "/dev/shm/aiter_dist-"


def max_programs_for(device_type: str) -> int:
    # The interpreter runs programs one after another: two exercise the multi-program paths. On
    # GPUs, enough programs to give every SM of the largest current parts one (H200: 132).
    return 2 if device_type == "cpu" else 512


# Programs a collective launches at most (the grid grows with the message up to this). The signal
# area has room for max_programs_for(); AITER_DIST_MAX_GRID overrides the GPU figure (sweeps).
MAX_GRID = {"cpu": 2, "cuda": int(os.environ.get("AITER_DIST_MAX_GRID", "64"))}


def max_grid(ws) -> int:
    return min(MAX_GRID["cpu" if ws.device.type == "cpu" else "cuda"], ws.max_programs)


def signal_words(max_programs: int) -> int:
    """int32 words of the signal area: counters, epochs, the poison word, the record lock."""
    return SIGNAL_CHANNELS * max_programs * (MAX_WORLD + 1) + 2


def signal_bytes(max_programs: int) -> int:
    return cdiv(signal_words(max_programs) * 4, 4096) * 4096  # whole pages: data stays aligned


def host_name() -> str:
    """The host this rank reports when a group's state is made: ``AITER_DIST_HOSTNAME`` if set
    (tests fake several hosts on one machine with it; a cluster can name hosts whose hostnames
    clash), else ``socket.gethostname()``. Ranks of one group on different hosts cannot share
    peer-to-peer buffers."""
    return os.environ.get("AITER_DIST_HOSTNAME") or socket.gethostname()


def group_name(group) -> str:
    return getattr(group, "group_name", None) or str(group)


def backend_name() -> str:
    name = os.environ.get("AITER_DIST_WORKSPACE_BACKEND", "symm_mem")
    if name not in BACKENDS:
        raise ValueError(f"aiter_dist: AITER_DIST_WORKSPACE_BACKEND={name!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    return name


# ----------------------------------------------------------------------------- /dev/shm files

def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def sweep_stale_files() -> int:
    """Remove ``/dev/shm`` files of groups whose creating process is gone; returns how many."""
    removed = 0
    for path in glob.glob(_SHM_PREFIX + "*"):
        m = re.match(re.escape(_SHM_PREFIX) + r"(\d+)-", path)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed


def _unlink_all(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _map_files(paths, nbytes: int):
    maps = []
    for p in paths:
        fd = os.open(p, os.O_RDWR)
        try:
            maps.append(mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        finally:
            os.close(fd)
    return maps


def _create_file(path: str, nbytes: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


# ----------------------------------------------------------------------------- group state

# Control block, int64 words per rank: pid, calls made (seq), then two slots for the records
# of the rank's composed calls (see policy.agree): the k-th goes to slot k % 2.
CTL_PID, CTL_SEQ, CTL_SLOTS = 0, 1, 2
CTL_SLOT_WORDS = 12
CTL_WORDS = CTL_SLOTS + 2 * CTL_SLOT_WORDS


class GroupState:
    """What every collective of a group needs on the host: whether the group can use the custom
    kernels at all (one host, at most MAX_WORLD ranks), the control block, the call counter, and
    the group's workspaces by device. Made collectively on the group's first collective."""

    def __init__(self, group):
        self.group = group
        self.name = group_name(group)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.seq = 0  # collective calls made on the group
        self.composed = 0  # of which composed (torch.distributed, unfused): agreed with peers
        self.workspaces: dict = {}
        self.broken: str | None = None  # set after an error: ranks may be mid-call
        sweep_stale_files()
        from . import protocol  # (imports this module)
        protocol.read_timeout_env()
        token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}" if self.rank == 0 else None
        ctl_path = f"{_SHM_PREFIX}{token}-ctl" if token else None
        nbytes = self.world_size * CTL_WORDS * 8
        if ctl_path:
            _create_file(ctl_path, nbytes)
        try:
            peers = [None] * self.world_size
            dist.all_gather_object(peers, (host_name(), os.getpid(), token),
                                   group=self.group)
        except BaseException:
            if ctl_path:
                _unlink_all([ctl_path])
            raise
        hosts = sorted({h for h, _, _ in peers})
        self.pids = [pid for _, pid, _ in peers]
        ctl_path = f"{_SHM_PREFIX}{peers[0][2]}-ctl"
        self.reason = None
        if len(hosts) > 1:
            by_host = {h: [r for r, (hr, _, _) in enumerate(peers) if hr == h] for h in hosts}
            where = "; ".join(f"{h}: ranks {rs}" for h, rs in list(by_host.items())[:4])
            self.reason = (f"group '{self.name}' spans {len(hosts)} hosts ({where}"
                           f"{'; ...' if len(hosts) > 4 else ''}): peer-to-peer buffers stay "
                           f"within one host; keep tensor parallelism inside a node "
                           f"(aiter_dist.distributed.init_parallel_mesh, train_llama.py --tp)")
        elif self.world_size > MAX_WORLD:
            self.reason = f"world size {self.world_size} > {MAX_WORLD}"
        self.ctl = None
        if self.reason is None:
            try:
                self._ctl_map = _map_files([ctl_path], nbytes)[0]
                self.ctl = np.frombuffer(self._ctl_map, dtype=np.int64).reshape(
                    self.world_size, CTL_WORDS)
                self.ctl[self.rank, CTL_PID] = os.getpid()
                dist.barrier(group=self.group)
            finally:
                _unlink_all([ctl_path])
        elif self.rank == 0:
            _unlink_all([ctl_path])
        self.watch = _GroupWatch(self.pids, self.rank)
        if self.reason is None:  # (pids of other hosts mean nothing here; nothing waits anyway)
            _watchdog.watch(self.watch)

    @property
    def exited_peer(self) -> int | None:
        """A peer whose process is gone (noticed by the watchdog), or None."""
        return self.watch.exited_peer

    @property
    def eligible(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        return f"group '{self.name}' (rank {self.rank} of {self.world_size})"

    def release(self) -> None:
        self.workspaces.clear()
        _watchdog.forget(self.watch)


_groups: dict[str, GroupState] = {}


def group_state(group) -> GroupState:
    """The group's host state, created collectively on first use."""
    st = _groups.get(group_name(group))
    if st is None or st.group is not group:
        st = _groups[group_name(group)] = GroupState(group)
    return st


# ----------------------------------------------------------------------------- workspace

class SymmetricWorkspace:
    """A per-(group, device) symmetric buffer. Create with :func:`get_workspace` (collective)."""

    def __init__(self, group, device: torch.device, nbytes: int):
        if nbytes < HEADER_BYTES + 4096:
            raise ValueError(f"aiter_dist workspace: size {nbytes} B is too small; ask for at "
                             f"least {HEADER_BYTES + 4096} B")
        self.state = group_state(group)
        if not self.state.eligible:
            raise ValueError(f"aiter_dist workspace: {self.state.describe()} cannot use custom "
                             f"collectives: {self.state.reason}")
        self.group = group
        self.device = device
        self.rank = self.state.rank
        self.world_size = self.state.world_size
        self.nbytes = nbytes
        self.max_programs = max_programs_for(device.type)
        self.sig_bytes = signal_bytes(self.max_programs)
        self.data_bytes = nbytes - HEADER_BYTES
        self.broken: str | None = None  # set after an error: flags may be mid-handshake
        self._keepalive = []
        total = self.sig_bytes + nbytes
        if device.type == "cpu":
            self.backend = "shm"
            bases = self._init_shm(total)
        else:
            self.backend = backend_name()
            bases = self._init_ipc(total) if self.backend == "ipc" else self._init_symm_mem(total)
        tensor_dev = device if device.type != "cpu" else None
        self.signal_ptrs = torch.tensor(bases, dtype=torch.int64, device=tensor_dev)
        self.buffer_ptrs = torch.tensor([b + self.sig_bytes for b in bases], dtype=torch.int64,
                                        device=tensor_dev)
        self.data_ptr = bases[self.rank] + self.sig_bytes + HEADER_BYTES
        self._bases = list(bases)  # every rank's allocation, in this process's address space
        self._peer_bytes: list | None = None  # byte tensors over them (peer_tensor), made lazily
        # Error record in host memory the device can write (pinned), read without a device sync.
        self.err = torch.zeros(ERR_FIELDS, dtype=torch.int64, pin_memory=device.type != "cpu")
        self.err_host = self.err.numpy()
        self.watch = _WorkspaceWatch(self.err_host)
        self.state.watch.slots[device] = self.watch  # (replaces a replaced workspace's)

    # ------------------------------------------------------------------ backends
    def _init_shm(self, total: int) -> list[int]:
        token = [f"{os.getpid()}-{uuid.uuid4().hex[:12]}" if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(self.group, 0),
                                   group=self.group)
        names = [f"{_SHM_PREFIX}{token[0]}-r{r}" for r in range(self.world_size)]
        try:
            _create_file(names[self.rank], total)  # zero-filled: clean signal area
            dist.barrier(group=self.group)
            maps = _map_files(names, total)
            dist.barrier(group=self.group)
        finally:
            _unlink_all(names)  # every rank has mapped them (or failed)
        self._keepalive = maps
        self.buffer = torch.frombuffer(maps[self.rank], dtype=torch.uint8, count=total)
        return [_address(m) for m in maps]

    def _init_symm_mem(self, total: int) -> list[int]:
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # required before torch 2.8, deprecated (a no-op) after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(group_name(self.group))
        self.buffer = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
        # Zeroed before the rendezvous, which no rank leaves before every rank has entered it:
        # no peer signals into this area before it is clean.
        self.buffer[:self.sig_bytes].zero_()
        torch.cuda.synchronize(self.device)
        try:
            self._handle = symm_mem.rendezvous(self.buffer, self.group)
        except RuntimeError as e:
            if "overlapping devices" in str(e):
                raise RuntimeError(
                    f"aiter_dist workspace: torch symmetric memory refuses several ranks of "
                    f"{self.state.describe()} on one GPU ({e}); run one rank per GPU or set "
                    f"AITER_DIST_WORKSPACE_BACKEND=ipc") from e
            raise
        return list(self._handle.buffer_ptrs)

    def _init_ipc(self, total: int) -> list[int]:
        ipc = _ipc_runtime()
        self.buffer = torch.zeros(total, dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)
        handle, offset = ipc.export(self.buffer.data_ptr())
        peers = [None] * self.world_size
        dist.all_gather_object(peers, (handle, offset, os.getpid()), group=self.group)
        bases = []
        for r, (h, off, pid) in enumerate(peers):
            if r == self.rank:
                bases.append(self.buffer.data_ptr())
            else:
                base = ipc.open(h)
                self._keepalive.append(_IpcMapping(ipc, base))
                bases.append(base + off)
        dist.barrier(group=self.group)  # every rank has opened every handle
        return bases

    # ------------------------------------------------------------------ helpers
    def set_deadline(self, t: float) -> None:
        """Arm (``t`` > 0, a ``time.monotonic()`` value) or disarm the watchdog's abort of a
        synchronous CPU launch."""
        self.watch.set_deadline(t)

    def signal_pads_clean(self) -> bool:
        """Whether every signal that reached this rank has been consumed: for every channel and
        program, each peer's counter equals this rank's epoch, and no error poisoned it."""
        n = signal_words(self.max_programs)
        pad = self.buffer[:n * 4].view(torch.int32).cpu()
        slots = SIGNAL_CHANNELS * self.max_programs
        counters = pad[:slots * MAX_WORLD].view(slots, MAX_WORLD)[:, :self.world_size]
        epochs = pad[slots * MAX_WORLD:slots * (MAX_WORLD + 1)]
        return bool((counters == epochs[:, None]).all()) and not pad[n - 2:].any()

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor over this rank's data region (see :func:`workspace_tensor`)."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.data_bytes:
            raise ValueError(f"aiter_dist.workspace_tensor: {shape} of {dtype} needs {nbytes} B but "
                             f"the workspace of {self.describe()} holds {self.data_bytes} B; "
                             f"create_workspace(nbytes=...) or AITER_DIST_WORKSPACE_BYTES makes a "
                             f"larger one")
        start = self.sig_bytes + HEADER_BYTES
        return self.buffer[start:start + nbytes].view(dtype).view(shape)

    def peer_tensor(self, rank: int, shape, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """A tensor over rank ``rank``'s data region (this rank's own too), ``offset`` bytes in.

        Reads and writes go straight to that rank's memory: on GPUs a ``copy_`` to or from it is
        a device-to-device (peer) copy, which the copy engine serves. The caller orders accesses
        with the peers (barriers); the tensor stays valid while the workspace lives."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset % dtype.itemsize or offset < 0 or offset + nbytes > self.data_bytes:
            raise ValueError(f"aiter_dist workspace: {shape} of {dtype} at byte {offset} does "
                             f"not fit the {self.data_bytes} B data region of {self.describe()}")
        if self._peer_bytes is None:
            self._peer_bytes = [self._rank_bytes(r) for r in range(self.world_size)]
        start = self.sig_bytes + HEADER_BYTES + offset
        return self._peer_bytes[rank][start:start + nbytes].view(dtype).view(shape)

    def _rank_bytes(self, r: int) -> torch.Tensor:
        """A uint8 tensor over rank ``r``'s whole allocation (signal area, header, data)."""
        total = self.sig_bytes + self.nbytes
        if r == self.rank:
            return self.buffer
        if self.backend == "shm":
            return torch.frombuffer(self._keepalive[r], dtype=torch.uint8, count=total)
        if self.backend == "symm_mem":
            return self._handle.get_buffer(r, (total,), torch.uint8, 0)
        # ipc: the peer's mapping (opened in this process, addressable from this rank's device
        # over peer access) as a tensor on THIS rank's device that does not own it; the mapping
        # outlives it. (Wrapping the pointer by __cuda_array_interface__ would place the tensor
        # on the peer's GPU, where torch would then run every copy, on that GPU's stream.)
        storage = torch._C._construct_storage_from_data_pointer(self._bases[r], self.device,
                                                                 total)
        return torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (total,),
                                                                          (1,))

    def holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is exactly a workspace tensor of this workspace (starts at its data
        region, contiguous, fits): collectives then skip the copy in."""
        return (x.data_ptr() == self.data_ptr and x.device == self.buffer.device
                and x.numel() > 0 and x.is_contiguous()
                and x.numel() * x.element_size() <= self.data_bytes)

    def describe(self) -> str:
        return (f"group '{self.state.name}' (rank {self.rank} of {self.world_size}, "
                f"{self.backend} workspace of {self.nbytes} B)")


# ----------------------------------------------------------------------------- IPC handles

class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]  # CUipcMemHandle / hipIpcMemHandle_t


class _IpcRuntime:
    """IPC memory handles through ctypes: CUDA's driver API (libcuda), or HIP's runtime."""

    def __init__(self):
        torch.cuda.init()
        if torch.version.hip:
            lib, names = "libamdhip64.so", ("hipMemGetAddressRange", "hipIpcGetMemHandle",
                                            "hipIpcOpenMemHandle", "hipIpcCloseMemHandle")
        else:
            lib, names = "libcuda.so.1", ("cuMemGetAddressRange_v2", "cuIpcGetMemHandle",
                                          "cuIpcOpenMemHandle_v2", "cuIpcCloseMemHandle")
        try:
            self.lib = ctypes.CDLL(lib)
        except OSError as e:
            raise RuntimeError(f"aiter_dist: the ipc workspace backend could not load {lib} "
                               f"({e})") from e
        self._range, self._get, self._open, self._close = (getattr(self.lib, n) for n in names)
        vp = ctypes.c_void_p
        self._range.argtypes = [ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_size_t), vp]
        self._get.argtypes = [ctypes.POINTER(_IpcHandle), vp]
        self._open.argtypes = [ctypes.POINTER(vp), _IpcHandle, ctypes.c_uint]
        self._close.argtypes = [vp]

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            hint = (" (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True makes allocations that "
                    "IPC handles cannot share)" if "Get" in what else "")
            raise RuntimeError(f"aiter_dist ipc workspace: {what} failed with error {rc}{hint}")

    def export(self, ptr: int) -> tuple[bytes, int]:
        """(handle of the allocation holding ``ptr``, ``ptr``'s offset into it)."""
        base, size = ctypes.c_void_p(), ctypes.c_size_t()
        self._check(self._range(ctypes.byref(base), ctypes.byref(size), ptr),
                    "MemGetAddressRange")
        handle = _IpcHandle()
        self._check(self._get(ctypes.byref(handle), base.value), "IpcGetMemHandle")
        # Raw bytes: the handle may hold NULs, which c_char fields would cut at.
        return ctypes.string_at(ctypes.addressof(handle), 64), ptr - base.value

    def open(self, handle: bytes) -> int:
        ptr, h = ctypes.c_void_p(), _IpcHandle()
        ctypes.memmove(ctypes.addressof(h), handle, 64)
        # flags 1: lazily enable peer access (same value in CUDA and HIP)
        self._check(self._open(ctypes.byref(ptr), h, 1), "IpcOpenMemHandle")
        return ptr.value

    def close(self, ptr: int) -> None:
        self._close(ptr)


_ipc = None


def _ipc_runtime() -> _IpcRuntime:
    global _ipc
    if _ipc is None:
        _ipc = _IpcRuntime()
    return _ipc


class _IpcMapping:
    def __init__(self, ipc, ptr):
        self._finalizer = weakref.finalize(self, ipc.close, ptr)


# ----------------------------------------------------------------------------- watchdog

class _WorkspaceWatch:
    """What the watchdog touches of a workspace: its error record and deadline, nothing that
    refers to the process group. (A thread holding the last reference to a group destroys it,
    which releases and retakes the GIL; a daemon thread that does so while the interpreter
    finalizes is ended mid-destructor, and the process aborts.)"""
    __slots__ = ("err", "deadline", "lock")

    def __init__(self, err_host):
        self.err, self.deadline, self.lock = err_host, 0.0, threading.Lock()

    def set_deadline(self, t: float) -> None:
        # Disarming withdraws an abort that came too late to matter.
        with self.lock:
            self.deadline = t
            if not t and self.err[ERR_ABORT] == ABORT_DEADLINE and self.err[ERR_CODE] == ERR_NONE:
                self.err[ERR_ABORT] = 0

    def abort_if_late(self, now: float) -> None:
        with self.lock:
            if self.deadline and now > self.deadline and not self.err[ERR_ABORT]:
                self.err[ERR_ABORT] = ABORT_DEADLINE

    def abort_exited(self, rank: int) -> None:
        if self.err[ERR_ABORT] != ABORT_PEER_EXITED:
            self.err[ERR_ABORT_RANK] = rank
            self.err[ERR_ABORT] = ABORT_PEER_EXITED


class _GroupWatch:
    """What the watchdog reads of a group: the peers' pids and its workspaces' watches (by
    device)."""
    __slots__ = ("pids", "rank", "exited_peer", "slots")

    def __init__(self, pids, rank):
        self.pids, self.rank, self.exited_peer, self.slots = list(pids), rank, None, {}


class _Watchdog:
    """One daemon thread per process while any group is watched: it notices a peer that exited
    (pid gone) and a CPU launch past its deadline, and sets the abort word of the affected
    workspaces, which waiting kernels poll. Wakes every ``PERIOD_S``; costs nothing per call.
    Stopped and joined when the last group is released (``release_workspaces``)."""

    PERIOD_S = 0.2

    def __init__(self):
        self._watches: list = []
        self._lock = threading.Lock()
        self._thread = None
        self._stop = None  # the running thread's own stop event

    def watch(self, w: _GroupWatch) -> None:
        with self._lock:
            self._watches.append(w)
            # (not alive: it died, or this process was forked from one that ran it)
            if self._thread is None or not self._thread.is_alive():
                # A fresh event per thread: a thread being stopped cannot miss its stop.
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                                name="aiter_dist-watchdog", daemon=True)
                self._thread.start()

    def forget(self, w: _GroupWatch) -> None:
        with self._lock:
            if w in self._watches:
                self._watches.remove(w)
            thread = self._thread if not self._watches else None
            if thread is not None:
                self._thread = None
                self._stop.set()
                self._stop = None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.PERIOD_S):
            with self._lock:
                watches = list(self._watches)
            now = time.monotonic()
            for w in watches:
                if w.exited_peer is None:
                    w.exited_peer = next((r for r, pid in enumerate(w.pids)
                                          if r != w.rank and not _alive(pid)), None)
                for slot in list(w.slots.values()):
                    if w.exited_peer is not None:
                        slot.abort_exited(w.exited_peer)
                    else:
                        slot.abort_if_late(now)
            del watches


_watchdog = _Watchdog()


# ----------------------------------------------------------------------------- registry

def _default_bytes(device: torch.device) -> int:
    env = os.environ.get("AITER_DIST_WORKSPACE_BYTES")
    return int(env) if env else DEFAULT_BYTES["cpu" if device.type == "cpu" else "cuda"]


def _device(device) -> torch.device:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def get_workspace(group=None, device: torch.device | str | None = None,
                  nbytes: int | None = None) -> SymmetricWorkspace:
    """The workspace of ``group`` on ``device``, created on first use (collectively: every rank of
    the group must call this, or the first collective that needs it, together).

    ``nbytes`` (or the ``AITER_DIST_WORKSPACE_BYTES`` environment variable) sets the size of a new
    workspace; an existing one of a different size is replaced.
    """
    group = group if group is not None else dist.group.WORLD
    device = _device(device)
    st = group_state(group)
    ws = st.workspaces.get(device)
    want = nbytes or (ws.nbytes if ws is not None else _default_bytes(device))
    if ws is None or ws.nbytes != want:
        if ws is not None:
            clear_plans()  # (the collectives' plans hold the workspace being replaced)
        ws = SymmetricWorkspace(group, device, want)
        st.workspaces[device] = ws
    return ws


def find_workspace(group=None, device=None) -> SymmetricWorkspace | None:
    """The existing workspace of ``group`` on ``device`` (or on any device), never creating one."""
    group = group if group is not None else dist.group.WORLD
    st = _groups.get(group_name(group))
    if st is None:
        return None
    for dev, ws in st.workspaces.items():
        if device is None or dev == torch.device(device):
            return ws
    return None


def workspace_data_bytes(group, device) -> int:
    """Data bytes of the group's workspace on ``device``: the existing one's, or what a new one
    would have."""
    ws = find_workspace(group, device)
    return ws.data_bytes if ws is not None else _default_bytes(torch.device(device)) - HEADER_BYTES


def create_workspace(group=None, device=None, nbytes: int | None = None) -> SymmetricWorkspace:
    """Create (or re-create at a new size) the workspace of ``group`` explicitly. Collective."""
    return get_workspace(group, device, nbytes)


def workspace_tensor(shape, dtype: torch.dtype = torch.bfloat16, group=None,
                     device=None) -> torch.Tensor:
    """A tensor that lives in this rank's workspace buffer of ``group``, for a producer to write
    its output into: ``all_reduce`` of exactly this tensor then skips the copy into the workspace.

    Collective on first use (it may create the workspace). The tensor is scratch space shared with
    every collective of the group: its contents are undefined after any collective on the group,
    including the one that consumed it. Use it as the input of the next collective only.
    """
    return get_workspace(group, device).tensor(shape, dtype)


def release_workspaces() -> None:
    """Drop every workspace and group state of this process: call before destroying process
    groups, and on every rank after a collective reported an error (the next collective then
    creates a fresh one)."""
    for st in _groups.values():
        st.release()
    _groups.clear()
    clear_plans()  # (the collectives' plans hold workspaces)
