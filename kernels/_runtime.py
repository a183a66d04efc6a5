"""Where kernels run, how they are launched, which path an op took, and the shared input checks.

Concerns every kernel family shares, kept here so each family file stays in the
reference / kernels / launchers / Function / functional order:

* **Interpreter selection.** On a machine with no GPU, Triton kernels run through Triton's
  interpreter. ``configure_interpreter()`` sets ``TRITON_INTERPRET=1`` before any kernel module
  is imported (Triton reads it when ``@triton.jit`` decorates). A user's own setting wins.
  On a GPU machine, CPU tensors take each op's PyTorch path, visibly (``runs_triton``).
* **Path records.** Every op notes which implementation served the last call
  (``last_path(op)``); a fallback away from the fast path is logged once per (op, reason).
* **Checks.** Bad input raises ``ValueError``/``TypeError`` that names the op and the fix.
* **Launches.** ``launch()`` calls a kernel's compiled launcher directly once the kernel is
  known for the call's specialization (``fast_launch``; ``AITER_DIST_FAST_LAUNCH=0`` restores
  Triton's JIT call), and ``cdiv``/``next_pow2`` do host arithmetic without Triton's
  constexpr machinery.
* **torch.compile.** ``compiling()`` tells the public functions to call their custom ops.
"""
from __future__ import annotations

import inspect
import logging
import os
import warnings

import numpy as np
import torch

log = logging.getLogger("aiter_dist")


# ----------------------------------------------------------------------------- interpreter

def _has_gpu() -> bool:
    return torch.cuda.is_available()


def configure_interpreter() -> bool:
    """Turn on Triton's interpreter when no GPU is present, unless the user already chose.

    Returns whether kernels decorated from now on are interpreted.
    """
    if "TRITON_INTERPRET" not in os.environ and not _has_gpu():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = configure_interpreter()

from triton import knobs as _knobs  # noqa: E402  (after the interpreter choice: Triton reads it)
from triton.runtime import _allocation  # noqa: E402

# Triton launches on the current device's current stream; these are what its driver calls too.
_current_device = getattr(torch._C, "_cuda_getDevice", lambda: torch.cuda.current_device())
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream",
                          lambda index: torch.cuda.current_stream(index).cuda_stream)



def runs_triton(op: str, device: torch.device) -> bool:
    """Whether ``op`` can run its Triton kernel on ``device`` in this process.

    Triton runs either compiled (GPU) or interpreted (no GPU) for the whole process: its standard
    library (``tl.sum`` and friends) is itself compiled or interpreted at import. So a CPU tensor
    on a GPU machine cannot reach a kernel; the op then takes its PyTorch path, recorded and
    logged once. (On a machine without a GPU, CPU tensors run the kernels through the interpreter.)
    """
    if device.type == "cpu" and not INTERPRETED:
        record_path(op, "torch", "CPU tensor on a GPU machine: Triton runs compiled here")
        return False
    return True


def takes_torch_path(op: str, tensors: tuple, also: tuple = ()) -> bool:
    """Whether ``op`` serves this call with PyTorch ops instead of its kernel, recorded as
    ``"torch"``: float64 among ``tensors`` and ``also`` (the kernels compute in fp32; PyTorch
    keeps float64), a zero-size tensor among ``tensors`` (nothing to launch), or CPU tensors on a
    GPU machine (see :func:`runs_triton`)."""
    # (Loops, not any() over generators: this runs on every call of the norms.)
    for t in tensors + also:
        if t.dtype == torch.float64:
            record_path(op, "torch", "float64 input: computed by PyTorch in float64; the "
                                     "Triton kernels take float32, float16 and bfloat16")
            return True
    for t in tensors:
        if t.numel() == 0:
            record_path(op, "torch")
            return True
    return not runs_triton(op, tensors[0].device)


def launch(kernel, grid, device: torch.device, *args, launch_key=None, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)``; callers check :func:`runs_triton` first.

    Compiled launches go through :func:`fast_launch` (``launch_key``: its ``key``); interpreted
    ones run with numpy's floating-point warnings silenced (NaN or inf inputs are legitimate
    data, not errors)."""
    if INTERPRETED:
        if device.type != "cpu":
            # The interpreter copies GPU tensors to the host and back on every launch: correct
            # for plain kernels, wrong for kernels that follow raw peer pointers.
            record_path(kernel.__name__, "interpreter-on-gpu-tensors",
                        "TRITON_INTERPRET=1 is set on a GPU machine; unset it for compiled kernels")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return kernel[grid](*args, **kwargs)
    return fast_launch(kernel, grid, device, args, kwargs, launch_key)


# ----------------------------------------------------------------------------- cached launches
#
# Triton's JIT call re-derives, on every launch, each argument's specialization (type,
# 16-byte alignment, value 1), a cache key from them, the device and the stream, and checks the
# kernel's globals: 17 us a call on the H200 hosts against 7.7 for torch.add. The compiled
# kernel's own launcher takes ~1/3 of that. fast_launch keys the compiled kernel by a cheaper
# description that determines Triton's specialization (it distinguishes at least what Triton
# does), gets the kernel from one JIT call on a miss, and then calls its launcher directly.

FAST_LAUNCH = os.environ.get("AITER_DIST_FAST_LAUNCH", "1") == "1"
_I32 = (-2**31, 2**31)


def spec_tensor(t):
    """What Triton specializes a tensor argument on: its dtype and 16-byte alignment."""
    return t.dtype, t.data_ptr() & 15


def spec_int(v):
    """What Triton specializes an int argument on: 1, divisibility by 16, 32 or 64 bits."""
    return v == 1, v & 15, _I32[0] <= v < _I32[1], type(v) is bool


_SPEC = {torch.Tensor: spec_tensor, torch.nn.Parameter: spec_tensor, int: spec_int,
         bool: spec_int, float: lambda v: "fp32", type(None): lambda v: None}


def _int_class(a: int):
    """fast_launch's key of an int outside -1..2**31: its residue mod 16 in a band per range
    (32-bit negative 32..47, 64-bit 48..63, 64-bit negative 64..79); by value past 64 bits."""
    if -2**31 <= a < 0:
        return (a & 15) + 32
    if 2**31 <= a < 2**63:
        return (a & 15) + 48
    if -2**63 <= a < -2**31:
        return (a & 15) + 64
    return ("int", a)


def _spec(a):
    f = _SPEC.get(type(a))
    if f is not None:
        return f(a)
    if isinstance(a, torch.Tensor):
        return spec_tensor(a)
    base = getattr(a, "base", None)  # a host tensor descriptor: its block and strides matter
    if isinstance(base, torch.Tensor):
        return (base.dtype, base.data_ptr() & 15, tuple(a.block_shape),
                tuple(s & 15 for s in a.strides), tuple(a.shape))
    raise TypeError(type(a))


class _Compiled:
    """A compiled kernel's launcher and the constexpr values that follow the positional args."""
    __slots__ = ("run", "function", "packed", "tail")

    def __init__(self, ck, kernel, n_args, kwargs):
        names = kernel.arg_names
        tail = []
        for i in range(n_args, len(names)):
            if names[i] in kwargs:
                tail.append(kwargs[names[i]])
            else:
                default = kernel.params[i].default
                if default is inspect.Parameter.empty:
                    raise TypeError(f"{kernel.__name__}: {names[i]} has no value")
                tail.append(default)
        self.run, self.function, self.packed = ck.run, ck.function, ck.packed_metadata
        self.tail = tuple(tail)


_compiled: dict = {}


def _hooked() -> bool:
    """Whether a profiler's launch hooks are attached (an empty HookChain when none is)."""
    hook = _knobs.runtime.launch_enter_hook
    return hook is not None and getattr(hook, "calls", True)


def _launch_key(args, kwargs):
    # Inline, no call per argument (on Python 3.12 the comprehension itself is inlined too): an
    # int in (1, 2**31) by its residue mod 16 (16..31), -1, 0 and 1 by value, other ints by range
    # and residue (_int_class); a tensor by dtype and alignment; _spec for the rest (a float as
    # "fp32", never equal to an int's key). Each determines Triton's specialization; ~6x cheaper
    # than a tuple per argument.
    return (tuple([((a & 15) + 16 if 1 < a < 2147483648 else a if -2 < a < 2 else
                    _int_class(a)) if type(a) is int else
                   (a.dtype, a.data_ptr() & 15) if type(a) is torch.Tensor else
                   _spec(a) for a in args]), tuple(kwargs.items()))


def fast_launch(kernel, grid, device: torch.device, args, kwargs, key=None):
    """``kernel[grid](*args, **kwargs)`` through the compiled kernel's own launcher once the
    kernel is known (``AITER_DIST_FAST_LAUNCH=0``: always Triton's JIT call). ``key``: the
    caller's own description of the call, which must determine Triton's specialization of every
    argument (the collectives pass one built from the few arguments that vary)."""
    hook = _knobs.runtime.launch_enter_hook  # (inline _hooked(): this runs on every launch)
    if not FAST_LAUNCH or (hook is not None and getattr(hook, "calls", True)):
        return kernel[grid](*args, **kwargs)  # a profiler's launch hooks: Triton's own path
    index = _current_device()
    try:
        key = (kernel, index, _launch_key(args, kwargs) if key is None else key)
        entry = _compiled.get(key)
    except TypeError:  # an argument we cannot describe (or an unhashable constexpr)
        return kernel[grid](*args, **kwargs)
    if entry is None:
        ck = kernel[grid](*args, **kwargs)
        try:
            _compiled[key] = _Compiled(ck, kernel, len(args), kwargs)
        except (AttributeError, TypeError) as e:  # another Triton's internals: stay on the JIT
            _compiled[key] = False
            record_path(kernel.__name__, "triton-jit-launch", f"no cached launch: {e}")
        return ck
    if entry is False:
        return kernel[grid](*args, **kwargs)
    n = len(grid)
    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
              _current_stream(index), entry.function, entry.packed, None, None, None,
              *args, *entry.tail)
    return None


# ----------------------------------------------------------------------------- launch plans
#
# fast_launch still describes every argument on every call (~6 us for 15 arguments on the H200
# hosts, against 8 for the launcher itself). An op that keys its own cache by what fixes its int
# arguments (shapes, strides, dtypes, device) keeps a LaunchPlan per key instead: the compiled
# launcher, the grid and the constexprs, called with the tensors and scalars alone. Tensors
# are specialized on 16-byte alignment too: plans are made from aligned calls only, and the op
# checks its pointers' alignment before it uses one (a misaligned call takes the full path).

class LaunchPlan:
    """A kernel launch whose grid, constexprs and int arguments' specialization are fixed: call
    it with the launch's positional arguments. ``extra``: what the op keeps beside it."""
    __slots__ = ("kernel", "grid", "device", "kwargs", "entry", "index", "extra")

    def __init__(self, kernel, grid, device, kwargs, entry, index, extra=None):
        self.kernel, self.device, self.kwargs = kernel, device, kwargs
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.entry, self.index, self.extra = entry, index, extra

    def __call__(self, *args):
        e = self.entry
        if e is None or _hooked():  # the interpreter, AITER_DIST_FAST_LAUNCH=0, or a profiler
            return launch(self.kernel, self.grid, self.device, *args, **self.kwargs)
        g = self.grid
        e.run(g[0], g[1], g[2], _current_stream(self.index), e.function, e.packed, None, None,
              None, *args, *e.tail)
        return None


_plan_caches: list = []


def signature(t):
    """What a plan is keyed by for a tensor: shape, strides, dtype and device."""
    return t.shape, t.stride(), t.dtype, t.device


PLAN_CACHE_SIZE = 4096  # entries per op; a full cache starts afresh (shapes that keep changing)


class _PlanCache(dict):
    __slots__ = ()

    def __setitem__(self, key, value):
        if len(self) >= PLAN_CACHE_SIZE:
            self.clear()
        dict.__setitem__(self, key, value)


def plan_cache() -> dict:
    """A new dict of an op's plans, emptied by :func:`clear_plans` (and when it holds
    ``PLAN_CACHE_SIZE`` entries)."""
    cache = _PlanCache()
    _plan_caches.append(cache)
    return cache


def clear_plans() -> None:
    """Forget every op's plans (after changing a dispatch table or config at run time)."""
    for cache in _plan_caches:
        cache.clear()


def plan_device(device: torch.device):
    """The current CUDA device, part of the key of a plan for a call on ``device``: Triton
    launches there. None for CPU tensors (which must not initialize CUDA), the interpreter and
    code being traced by torch.compile (which cannot put the device's index in its graph)."""
    if INTERPRETED or device.type != "cuda" or compiling():
        return None
    return _current_device()


def plan_launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``launch(kernel, grid, device, *args, **kwargs)``, and a :class:`LaunchPlan` that repeats
    it for arguments of the same specialization; None when a tensor argument is not 16-byte
    aligned (the kernel compiled for it would not serve aligned ones as fast)."""
    launch(kernel, grid, device, *args, **kwargs)
    return plan_of(kernel, grid, device, args, kwargs)


def plan_of(kernel, grid, device: torch.device, args, kwargs, launch_key=None):
    """The :class:`LaunchPlan` that repeats the launch just made with ``args`` and ``kwargs``
    (``launch_key``: the key it was launched with, if the caller gave fast_launch one); None when
    a tensor argument is not 16-byte aligned."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.data_ptr() & 15:
            return None
    entry, index = None, None
    if not INTERPRETED:
        index = _current_device()
        try:
            key = _launch_key(args, kwargs) if launch_key is None else launch_key
            entry = _compiled.get((kernel, index, key)) or None
        except TypeError:
            entry = None
    return LaunchPlan(kernel, grid, device, kwargs, entry, index)


# ----------------------------------------------------------------------------- global scratch
#
# Kernels that build TMA descriptors on the GPU (``tl.make_tensor_descriptor``) need 128 bytes of
# global scratch per descriptor and program, which Triton's launcher asks of the allocator set by
# ``triton.set_allocator``. That setting is a context variable: each thread starts without one
# (autograd runs the backward on threads of its own), so the launchers call this before such a
# launch. A user's own allocator stays.

def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device=_current_device())


def ensure_scratch_allocator() -> None:
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        _allocation._allocator.set(_torch_scratch)


# ----------------------------------------------------------------------------- torch.compile

# Every public op has a torch.library custom op (a fake implementation for shapes, autograd
# registered on it) that torch.compile traces as one node. Eager calls do not go through the
# dispatcher, which would add tens of microseconds a call: the public functions check this.
compiling = torch.compiler.is_compiling


# ----------------------------------------------------------------------------- host arithmetic

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side of launchers (``triton.cdiv`` goes through Triton's
    constexpr machinery when called from Python: ~4 us a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), for block sizes on the host."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# ----------------------------------------------------------------------------- path records

_last_path: dict[str, str] = {}
_warned: set = set()


def record_path(op: str, path: str, fallback_reason: str | None = None) -> None:
    """Note the implementation that served ``op``; log once per (op, reason) when it is a fallback."""
    _last_path[op] = path
    if fallback_reason is not None and (op, fallback_reason) not in _warned:
        _warned.add((op, fallback_reason))
        log.warning("aiter_dist.%s: using %s (%s)", op, path, fallback_reason)


def last_path(op: str) -> str | None:
    """The implementation that served the most recent call of ``op`` in this process."""
    return _last_path.get(op)


# ----------------------------------------------------------------------------- checks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, ndim_min: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"aiter_dist.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"aiter_dist.{op}: {name} has dtype {t.dtype}; supported: {names}")
    if t.dim() < ndim_min:
        raise ValueError(f"aiter_dist.{op}: {name} must have at least {ndim_min} dimension(s), "
                         f"got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"aiter_dist.{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; move them to one device")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"aiter_dist.{op}: {name} must be contiguous in its last dimension "
                         f"(stride {t.stride()}); call .contiguous() first")
