"""The symmetric workspace: one buffer of the same size on every rank of a group, every rank
knowing every peer's address, plus signal slots for barriers.

Kernels receive two int64 tables, ``buffer_ptrs[world]`` and ``signal_ptrs[world]``, valid in the
calling process, and never learn which backend made them:

* ``cuda`` / ``hip``: ``torch.distributed._symmetric_memory`` (multicast stays off).
* ``cpu``: one file per rank in ``/dev/shm``, mapped by every rank of the group. Each rank removes
  its own file as soon as every rank has mapped it, so a crash leaves nothing behind. Triton's
  interpreter then runs the same kernels with real cross-process loads, stores and atomics.

Signal pads hold int32 counters laid out as ``[channel][program][source rank]``
(``SIGNAL_CHANNELS x max_programs x MAX_WORLD``), then this rank's epochs ``[channel][program]``.
Counters only grow: a sender adds 1 in every peer's pad, a receiver waits until every peer's
counter in its own pad reaches its next epoch, then records that epoch.

Each workspace also carries an error record (host-readable, pinned on GPU) where kernels report a
peer that never arrived or a peer that launched a different message.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import uuid
import warnings

import torch
import torch.distributed as dist

MAX_WORLD = 8
SIGNAL_CHANNELS = 2
HEADER_BYTES = 256  # per-rank launch header (numel, dtype) checked by peers; data starts after it
DEFAULT_BYTES = {"cpu": 8 << 20, "cuda": 64 << 20}

# Error record: [code, op id, missing or mismatched rank, program, peer's elements, peer's dtype
# code, this rank's elements, this rank's dtype code]; the first error of a launch wins.
ERR_NONE, ERR_TIMEOUT, ERR_MISMATCH = 0, 1, 2
ERR_FIELDS = 8


def signal_pad_bytes(max_programs: int) -> int:
    """Counters [channel][program][source rank], then epochs [channel][program]: int32 each."""
    return SIGNAL_CHANNELS * max_programs * (MAX_WORLD + 1) * 4


def group_name(group) -> str:
    return getattr(group, "group_name", None) or str(group)


class SymmetricWorkspace:
    """A per-(group, device) symmetric buffer. Create with :func:`get_workspace` (collective)."""

    def __init__(self, group, device: torch.device, nbytes: int):
        if nbytes < HEADER_BYTES + 4096:
            raise ValueError(f"aiter_dist workspace: size {nbytes} B is too small; ask for at "
                             f"least {HEADER_BYTES + 4096} B")
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.world_size > MAX_WORLD:
            raise ValueError(f"aiter_dist workspace: world size {self.world_size} exceeds "
                             f"{MAX_WORLD}; custom collectives serve up to {MAX_WORLD} ranks")
        self.nbytes = nbytes
        self.broken: str | None = None  # set after an error: flags may be mid-handshake
        self._keepalive = []
        if device.type == "cpu":
            self.backend = "cpu"
            self._init_shm()
        else:
            self.backend = "hip" if torch.version.hip else "cuda"
            self._init_symm_mem()
        self.data_bytes = nbytes - HEADER_BYTES
        # Error record: host memory the device can write (pinned) so the host reads it without a
        # device sync; kernels get its address.
        self.err = torch.zeros(ERR_FIELDS, dtype=torch.int32,
                               pin_memory=device.type != "cpu")
        self.err_host = self.err.numpy()

    # ------------------------------------------------------------------ backends
    def _init_shm(self):
        sig_bytes = self.signal_pad_bytes = signal_pad_bytes(self.max_programs_for("cpu"))
        token = [uuid.uuid4().hex[:16] if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(self.group, 0), group=self.group)
        names = [f"/dev/shm/aiter_dist-{token[0]}-r{r}" for r in range(self.world_size)]
        own = names[self.rank]
        fd = os.open(own, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.nbytes + sig_bytes)
        finally:
            os.close(fd)
        try:
            dist.barrier(group=self.group)
            maps = []
            for name in names:
                fd = os.open(name, os.O_RDWR)
                try:
                    maps.append(mmap.mmap(fd, self.nbytes + sig_bytes, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE))
                finally:
                    os.close(fd)
            dist.barrier(group=self.group)
        finally:
            os.unlink(own)  # every rank has mapped it (or failed): nothing outlives the processes
        self._keepalive = maps
        addrs = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in maps]
        self.buffer = torch.frombuffer(maps[self.rank], dtype=torch.uint8, count=self.nbytes)
        self.buffer_ptrs = torch.tensor(addrs, dtype=torch.int64)
        self.signal_ptrs = torch.tensor([a + self.nbytes for a in addrs], dtype=torch.int64)

    def _init_symm_mem(self):
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # required before torch 2.8, deprecated (a no-op) after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                enable(group_name(self.group))
        self.buffer = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(self.buffer, self.group)
        self.signal_pad_bytes = self._handle.signal_pad_size
        need = signal_pad_bytes(self.max_programs_for("cuda"))
        if need > self.signal_pad_bytes:
            raise RuntimeError(f"aiter_dist workspace: signal pad of {self.signal_pad_bytes} B "
                               f"holds fewer than the {need} B the collectives need")
        self.buffer_ptrs = torch.tensor(list(self._handle.buffer_ptrs), dtype=torch.int64,
                                        device=self.device)
        self.signal_ptrs = torch.tensor(list(self._handle.signal_pad_ptrs), dtype=torch.int64,
                                        device=self.device)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def max_programs_for(device_type: str) -> int:
        # The interpreter runs programs one after another: two exercise the multi-program paths.
        return 2 if device_type == "cpu" else 64

    @property
    def max_programs(self) -> int:
        return self.max_programs_for(self.device.type)

    def signal_pads_clean(self) -> bool:
        """Whether every signal that reached this rank has been consumed: for every channel and
        program, each peer's counter equals this rank's epoch (tests, and after errors)."""
        n = signal_pad_bytes(self.max_programs) // 4
        if self.backend == "cpu":
            pad = torch.frombuffer(self._keepalive[self.rank], dtype=torch.int32,
                                   offset=self.nbytes, count=n)
        else:
            pad = self._handle.get_signal_pad(self.rank, (n,), dtype=torch.int32).cpu()
        slots = SIGNAL_CHANNELS * self.max_programs
        counters = pad[:slots * MAX_WORLD].view(slots, MAX_WORLD)[:, :self.world_size]
        epochs = pad[slots * MAX_WORLD:slots * (MAX_WORLD + 1)]
        return bool((counters == epochs[:, None]).all())

    @property
    def data_ptr(self) -> int:
        """Address of this rank's data region (after the launch header)."""
        return self.buffer.data_ptr() + HEADER_BYTES

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor over this rank's data region (see :func:`workspace_tensor`)."""
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.data_bytes:
            raise ValueError(f"aiter_dist.workspace_tensor: {shape} of {dtype} needs {nbytes} B but "
                             f"the workspace of {self.describe()} holds {self.data_bytes} B; "
                             f"create_workspace(nbytes=...) or AITER_DIST_WORKSPACE_BYTES makes a "
                             f"larger one")
        return self.buffer[HEADER_BYTES:HEADER_BYTES + nbytes].view(dtype).view(shape)

    def holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is exactly a workspace tensor of this workspace (starts at its data
        region, contiguous, fits): collectives then skip the copy in."""
        return (x.device == self.buffer.device and x.numel() > 0 and x.is_contiguous()
                and x.data_ptr() == self.data_ptr
                and x.numel() * x.element_size() <= self.data_bytes)

    def describe(self) -> str:
        return (f"group '{group_name(self.group)}' (rank {self.rank} of {self.world_size}, "
                f"{self.backend} workspace of {self.nbytes} B)")


_workspaces: dict = {}


def _default_bytes(device: torch.device) -> int:
    env = os.environ.get("AITER_DIST_WORKSPACE_BYTES")
    return int(env) if env else DEFAULT_BYTES["cpu" if device.type == "cpu" else "cuda"]


def get_workspace(group=None, device: torch.device | str | None = None,
                  nbytes: int | None = None) -> SymmetricWorkspace:
    """The workspace of ``group`` on ``device``, created on first use (collectively: every rank of
    the group must call this, or the first collective that needs it, together).

    ``nbytes`` (or the ``AITER_DIST_WORKSPACE_BYTES`` environment variable) sets the size of a new
    workspace; an existing one of a different size is replaced.
    """
    group = group if group is not None else dist.group.WORLD
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (group_name(group), device)
    ws = _workspaces.get(key)
    want = nbytes or (ws.nbytes if ws is not None else _default_bytes(device))
    if ws is None or ws.nbytes != want:
        ws = SymmetricWorkspace(group, device, want)
        _workspaces[key] = ws
    return ws


def find_workspace(group=None, device=None) -> SymmetricWorkspace | None:
    """The existing workspace of ``group`` on ``device`` (or on any device), never creating one."""
    group = group if group is not None else dist.group.WORLD
    for (name, dev), ws in _workspaces.items():
        if name == group_name(group) and (device is None or dev == torch.device(device)):
            return ws
    return None


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
    """Drop every workspace of this process: call before destroying process groups, and on every
    rank after a collective reported an error (the next collective then creates a fresh one)."""
    _workspaces.clear()
