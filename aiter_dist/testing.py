"""Test helpers: the tolerance policy, a launcher for multi-process CPU/GPU tests, CUDA-graph
capture (tests and benchmarks)."""
from __future__ import annotations

import os
import pickle
import queue
import tempfile
import traceback

import torch

# ----------------------------------------------------------------------------- tolerance policy
#
# A kernel's output is compared with a float64 reference. Low-precision outputs may be off by
# rounding, and how much depends on the op: the bound is "at most FACTOR times PyTorch's own error
# in the same dtype" (flash-attention's rule), plus a floor for outputs PyTorch happens to round
# exactly. fp32 outputs are held to an absolute-plus-relative bound instead.

FACTOR = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs().max().item() \
        if a.numel() else 0.0


def assert_close_to_ref(name: str, out: torch.Tensor, ref64: torch.Tensor,
                        torch_out: torch.Tensor | None = None, factor: float = FACTOR,
                        floor: float | None = None) -> None:
    """Assert ``out`` is within the policy of the float64 reference ``ref64``.

    ``torch_out`` is PyTorch's result for the same computation in ``out``'s dtype; when given, the
    bound is ``factor * err(torch_out) + floor``, else ``floor * (1 + max|ref|)``.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output"
    floor = FLOOR.get(out.dtype, 1e-5) if floor is None else floor
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if torch_out is not None:
        bound = factor * max_err(torch_out, ref64) + floor * (1 + scale)
    else:
        bound = floor * (1 + scale)
    err = max_err(out, ref64)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e} ({out.dtype})"


# ----------------------------------------------------------------------------- multi-process runs

def _worker(fn, rank, world, init_file, backend, args, results, env):
    import torch.distributed as dist

    os.environ.update(env)
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        torch.set_num_threads(1)
        # Pickled by value here: torch's queue would pass tensors as shared-memory handles that
        # die with this process.
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from aiter_dist.comm import release_workspaces

            release_workspaces()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 240,
                    env: dict | None = None, exits=()):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process
    group; return the per-rank results in rank order, or raise with every failing rank's traceback.

    ``fn`` must be importable by name (a module-level function). A run that outlives ``timeout``
    seconds is killed and reported, so a hang fails the test instead of blocking it. Ranks in
    ``exits`` are expected to end their process without a result (their entry is None).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""), **(env or {})}
    child_env = {k: v for k, v in child_env.items() if v != ""}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, backend, args,
                                                   results, child_env), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out, errors = {}, []
        try:
            for _ in range(world_size - len(exits)):
                rank, status, value = results.get(timeout=timeout)
                if status == "ok":
                    out[rank] = pickle.loads(value)
                else:
                    errors.append((rank, value))
        except queue.Empty:
            errors.append((-1, f"timed out after {timeout} s; finished ranks: {sorted(out)}"))
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors)
        raise AssertionError(f"{fn.__name__} failed on {len(errors)} rank(s):\n{msg}")
    return [out.get(r) for r in range(world_size)]


def gpu_world() -> int:
    """Ranks of the multigpu tier: ``AITER_DIST_TEST_GPU_RANKS``, else one per visible GPU."""
    env = os.environ.get("AITER_DIST_TEST_GPU_RANKS")
    return int(env) if env else (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def shares_gpus(world: int | None = None) -> bool:
    """Whether ``world`` GPU ranks (default :func:`gpu_world`) outnumber the visible GPUs."""
    return (world or gpu_world()) > torch.cuda.device_count()


def run_gpu_ranks(fn, *args, world: int | None = None, env: dict | None = None, **kwargs):
    """:func:`run_distributed` on GPU ranks: one rank per GPU over NCCL; more ranks than GPUs
    share them through the IPC workspace (``AITER_DIST_WORKSPACE_BACKEND=ipc``) in a gloo group,
    since NCCL and torch symmetric memory refuse two ranks on one GPU. Their kernels then
    time-slice the device: every barrier, header check and peer read is real, the speed is not."""
    world = world or gpu_world()
    env = dict(env or {})
    if shares_gpus(world):
        env.setdefault("AITER_DIST_WORKSPACE_BACKEND", "ipc")
    return run_distributed(fn, world, *args, backend="gloo" if shares_gpus(world) else "nccl",
                           env=env, **kwargs)


# ----------------------------------------------------------------------------- torch.compile

# What ``torch.library.opcheck`` checks on every custom op (its default list, less nothing).
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor",
           "test_aot_dispatch_dynamic")


def assert_compiled_matches_eager(fn, inputs, atol: float = 1e-5, backend: str = "aot_eager",
                                  loss=None, check_strides: bool = False):
    """``torch.compile(fn, fullgraph=True)`` against eager ``fn``: the same output (and strides
    when asked) and the same gradient of every floating-point input. ``loss(out)`` is what is
    differentiated (default ``out.float().sum()``); integer inputs (targets) get no gradient."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    a, b = ([t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            for _ in range(2))
    out_c, out_e = compiled(*a), fn(*b)
    torch.testing.assert_close(out_c, out_e, atol=atol, rtol=atol)
    if check_strides:
        assert out_c.stride() == out_e.stride(), (out_c.stride(), out_e.stride())
    loss = loss or (lambda out: out.float().sum())
    loss(out_c).backward()
    loss(out_e).backward()
    for x, y in zip(a, b):
        if y.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=atol)


# ----------------------------------------------------------------------------- CUDA graphs

def capture_graph(fn, calls: int = 1, warmup: int = 3):
    """Warm ``fn`` up on a side stream (as capture requires: kernels compile, workspaces are made),
    then capture ``calls`` calls of it into a ``torch.cuda.CUDAGraph``. Returns ``(graph, out)``
    with ``out`` the last captured call's return value (static tensors refreshed by replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out
