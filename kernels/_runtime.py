"""Where kernels run, which path an op took, and the shared input checks.

Three concerns every kernel family shares, kept here so each family file stays in the
reference / kernels / launchers / Function / functional order:

* **Interpreter selection.** On a machine with no GPU, Triton kernels run through Triton's
  interpreter. ``configure_interpreter()`` sets ``TRITON_INTERPRET=1`` before any kernel module
  is imported (Triton reads it when ``@triton.jit`` decorates). A user's own setting wins.
  On a GPU machine, CPU tensors take each op's PyTorch path, visibly (``runs_triton``).
* **Path records.** Every op notes which implementation served the last call
  (``last_path(op)``); a fallback away from the fast path is logged once per (op, reason).
* **Checks.** Bad input raises ``ValueError``/``TypeError`` that names the op and the fix.
"""
from __future__ import annotations

import logging
import os

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


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)``; callers check :func:`runs_triton` first."""
    if device.type != "cpu" and INTERPRETED:
        # The interpreter copies GPU tensors to the host and back on every launch: correct for
        # plain kernels, wrong for kernels that follow raw peer pointers.
        record_path(kernel.__name__, "interpreter-on-gpu-tensors",
                    "TRITON_INTERPRET=1 is set on a GPU machine; unset it for compiled kernels")
    return kernel[grid](*args, **kwargs)


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
