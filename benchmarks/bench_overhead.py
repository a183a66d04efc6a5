"""Host time per eager call: aiter_dist's ops against their PyTorch counterparts, one GPU.

    python benchmarks/bench_overhead.py [--profile] [--floor] [--autograd] [--trace ROW ...]

Each op runs on small inputs (its GPU time is a few microseconds) in a loop of N calls; the
wall time of the loop before the closing synchronize, divided by N, is the host's cost of one
call (the GPU keeps up). Median of 7 loops. The collectives run in a process group of one with
the kernel forced (``custom_all_reduce_raw``, ``algo="one_shot"`` with ``one_rank_kernel``): the
same Python path and launch as in a larger group; NCCL and ``torch.ops.symm_mem`` run in the same
group of one. ``--profile`` prints a cProfile of 300 calls of each of our ops. ``--floor`` times
the pieces every call is made of (an allocation, a tensor attribute, a Triton launch through the
JIT, through ``fast_launch`` and through the compiled launcher alone), the floor of a call.
``--autograd`` splits a forward+backward's host time (the engine, a Python backward, the thread
the backward runs on) and stops.
``--trace`` runs torch.profiler (CPU activities, every thread) over 50 calls of the rows whose
name starts with one of its words, ours and PyTorch's: the host time per operator and per
thread (the autograd engine runs CUDA backwards on a thread of its own), and a Chrome trace per
row under $OUT.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

import aiter_dist
from common import call_us, emit

N = 300


# Rows whose op records its path under another name.
_RECORDED_AS = {"flash_attn_func": "flash_attn", "flash_attn": "flash_attn_bwd"}


def on_caller(fn):
    """``fn`` with autograd's backward run on the calling thread, not the device's engine
    thread (``torch.autograd.set_multithreading_enabled(False)``)."""
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            fn()
    return run


def host_us(fn, n=N, loops=7):
    return call_us(fn, n, loops, warmup=20, sync=torch.cuda.synchronize)


def cases():
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(8, 1024, device=dev, dtype=bf16)
    r = torch.randn_like(x)
    w = torch.ones(1024, device=dev, dtype=bf16)
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    g = torch.randn_like(x)
    q = torch.randn(1, 128, 8, 64, device=dev, dtype=bf16)
    qg, kg, vg = (q.clone().requires_grad_() for _ in range(3))
    qt = q.transpose(1, 2)
    qtg, ktg, vtg = (qt.detach().clone().requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    dout_t = dout.transpose(1, 2)
    lin_w = torch.randn(1024, 1024, device=dev, dtype=bf16)
    ar = importlib.import_module("aiter_dist.comm.all_reduce")
    small = torch.randn(4096, device=dev, dtype=bf16)
    mb = torch.randn(1 << 19, device=dev, dtype=bf16)

    cos, sin = torch.rand(128, 32, device=dev), torch.rand(128, 32, device=dev)
    tgt = torch.randint(0, 1024, (8,), device=dev)
    img = torch.randn(2, 64, 16, 16, device=dev, dtype=bf16).contiguous(
        memory_format=torch.channels_last)
    cw = torch.randn(64, 64, 3, 3, device=dev, dtype=bf16).contiguous(
        memory_format=torch.channels_last)

    def rope_torch(t):
        t1, t2 = t.float().chunk(2, dim=-1)
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.cat([t1 * c - t2 * s, t1 * s + t2 * c], dim=-1).to(t.dtype)

    from aiter_dist.kernels import flash_attn as FA
    from aiter_dist.kernels import rmsnorm as RN

    def norm_launchers():
        _, _, rstd = RN.rms_norm_fwd(x, w)
        RN.rms_norm_bwd(g, x, w, rstd)

    def fa_launchers():
        o, lse = FA.flash_attn_fwd(q, q, q, 64 ** -0.5, True, (-1, -1))
        FA.flash_attn_bwd(dout, q, q, q, o, lse, 64 ** -0.5, True, (-1, -1))

    def fa_fwd_bwd():
        aiter_dist.flash_attn_func(qg, kg, vg, causal=True).backward(dout)

    def sdpa_fwd_bwd():
        F.scaled_dot_product_attention(qtg, ktg, vtg, is_causal=True).backward(dout_t)

    rows = [
        ("torch.add (reference)", lambda: torch.add(x, 1), None),
        ("rms_norm", lambda: aiter_dist.rms_norm(x, w), lambda: F.rms_norm(x, (1024,), w)),
        ("rms_norm fwd+bwd", lambda: aiter_dist.rms_norm(xg, w).backward(g),
         lambda: F.rms_norm(xg, (1024,), w).backward(g)),
        ("rms_norm fwd+bwd launchers", norm_launchers, None),
        ("rms_norm fwd+bwd, weight grad", lambda: aiter_dist.rms_norm(xg, wg).backward(g),
         lambda: F.rms_norm(xg, (1024,), wg).backward(g)),
        ("rms_norm fwd+bwd, weight grad, calling thread",
         on_caller(lambda: aiter_dist.rms_norm(xg, wg).backward(g)),
         on_caller(lambda: F.rms_norm(xg, (1024,), wg).backward(g))),
        ("add_rms_norm", lambda: aiter_dist.add_rms_norm(x, r, w),
         lambda: F.rms_norm(x + r, (1024,), w)),
        ("flash_attn_func fwd", lambda: aiter_dist.flash_attn_func(q, q, q, causal=True),
         lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True)),
        ("flash_attn_func fwd+bwd", fa_fwd_bwd, sdpa_fwd_bwd),
        # The same with the backward on the calling thread (train_llama's default), both sides.
        ("flash_attn_func fwd+bwd, calling thread", on_caller(fa_fwd_bwd),
         on_caller(sdpa_fwd_bwd)),
        # The launchers alone, no autograd: what the engine and the Function add is the rest.
        ("flash_attn fwd+bwd launchers", fa_launchers, None),
        ("linear", lambda: aiter_dist.linear(x, lin_w), lambda: F.linear(x, lin_w)),
        ("tgemm.mm", lambda: aiter_dist.tgemm.mm(x, lin_w), lambda: F.linear(x, lin_w)),
        # The training ops against PyTorch's own expression (several launches for RoPE).
        ("apply_rotary_emb_qk", lambda: aiter_dist.apply_rotary_emb_qk(q, q, cos, sin),
         lambda: (rope_torch(q), rope_torch(q))),
        ("swiglu", lambda: aiter_dist.swiglu(x, r), lambda: F.silu(x) * r),
        ("cross_entropy", lambda: aiter_dist.cross_entropy(x, tgt),
         lambda: F.cross_entropy(x, tgt)),
        ("conv2d 3x3", lambda: aiter_dist.conv2d(img, cw, None, 1, 1),
         lambda: F.conv2d(img, cw, None, 1, 1)),
        ("all_reduce 8 KB (kernel)", lambda: ar.all_reduce_raw(small, algo="one_shot",
                                                                one_rank_kernel=True),
         lambda: dist.all_reduce(small)),
        ("all_reduce 1 MB (kernel)", lambda: ar.all_reduce_raw(mb, algo="one_shot",
                                                                one_rank_kernel=True),
         lambda: dist.all_reduce(mb)),
    ]
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(4096, device=dev, dtype=bf16)
        symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        rows.append(("symm_mem one_shot 8 KB", lambda: torch.ops.symm_mem.one_shot_all_reduce(
            buf, "sum", dist.group.WORLD.group_name), None))
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
        print(f"torch.ops.symm_mem unavailable: {type(e).__name__}: {e}")
    return rows


@triton.jit
def _one_arg_kernel(X):
    pass


@triton.jit
def _many_args_kernel(A, B, C, D, E, F_, M, N, sa, sb, sc, eps, P: tl.constexpr, Q: tl.constexpr,
                      R: tl.constexpr):
    pass


class _Double(torch.autograd.Function):
    """2 * x with a Python backward: beside ``(2 * x).backward()``, the cost of a Function."""

    @staticmethod
    def forward(ctx, x):
        return x.mul(2)

    @staticmethod
    def backward(ctx, g):
        return g.mul(2)


def floor_rows():
    """Host us of the pieces of a call, one row each."""
    from aiter_dist.kernels import _runtime as rt

    dev = torch.device("cuda")
    x = torch.randn(8, 1024, device=dev, dtype=torch.bfloat16)
    ts = [torch.empty(16, device=dev) for _ in range(6)]
    many = (*ts, 8, 1024, 1024, 1024, 1024, 1e-6)
    many_kw = dict(P=True, Q=64, R=False)
    _many_args_kernel[(1,)](*many, **many_kw)
    _one_arg_kernel[(1,)](x)
    rt.fast_launch(_many_args_kernel, (1,), dev, many, many_kw)
    entry = next(v for k, v in rt._compiled.items() if k[0] is _many_args_kernel)
    stream = rt._current_stream(0)
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    return [
        ("(2 * x).backward(g), native", lambda: xg.mul(2).backward(g)),
        ("the same through a Python Function", lambda: _Double.apply(xg).backward(g)),
        ("x.device", lambda: x.device),
        ("x.data_ptr()", lambda: x.data_ptr()),
        ("x.stride(0)", lambda: x.stride(0)),
        ("torch.empty(8, fp32)", lambda: torch.empty(8, dtype=torch.float32, device=dev)),
        ("torch.empty_like(x)", lambda: torch.empty_like(x)),
        ("torch.is_grad_enabled()", torch.is_grad_enabled),
        ("current stream (raw)", lambda: rt._current_stream(rt._current_device())),
        ("1-arg kernel, JIT call", lambda: _one_arg_kernel[(1,)](x)),
        ("15-arg kernel, JIT call", lambda: _many_args_kernel[(1,)](*many, **many_kw)),
        ("15-arg kernel, fast_launch", lambda: rt.fast_launch(_many_args_kernel, (1,), dev, many,
                                                              many_kw)),
        ("15-arg kernel, launcher alone", lambda: entry.run(1, 1, 1, stream, entry.function,
                                                            entry.packed, None, None, None,
                                                            *many, *entry.tail)),
    ]


def trace(name, ours, base):
    """torch.profiler's host view of 50 calls of ``ours`` and of ``base``: per operator, per
    thread, and a Chrome trace each under $OUT."""
    from torch.profiler import ProfilerActivity, profile

    for who, fn in (("ours", ours), ("PyTorch", base)):
        if fn is None:
            continue
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
        print(f"===== {name}, {who}: 50 calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        threads: dict = {}
        for ev in prof.events():
            if ev.cpu_parent is None:  # top-level events: the thread's own busy time
                threads[ev.thread] = threads.get(ev.thread, 0.0) + ev.cpu_time_total
        print("top-level host us per call, by thread:",
              {t: round(us / 50, 1) for t, us in threads.items()})
        out = os.environ.get("OUT")
        if out:
            slug = "".join(c if c.isalnum() else "_" for c in f"{name}_{who}")
            prof.export_chrome_trace(os.path.join(out, f"trace_{slug}.json"))


def autograd_rows():
    """Where a forward+backward's host time goes: autograd's engine with a native and a Python
    backward, our forward alone under autograd, and the backward run on the calling thread
    (``set_multithreading_enabled(False)``; by default a CUDA backward runs on the engine's
    thread for the device, so a Python backward crosses threads and takes the GIL there)."""
    dev = torch.device("cuda")
    x = torch.randn(8, 1024, device=dev, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    w = torch.ones(1024, device=dev, dtype=torch.bfloat16)
    wg = w.clone().requires_grad_()
    native = lambda: xg.mul(2).backward(g)  # noqa: E731
    python = lambda: _Double.apply(xg).backward(g)  # noqa: E731
    ours = lambda: aiter_dist.rms_norm(xg, w).backward(g)  # noqa: E731
    ours_w = lambda: aiter_dist.rms_norm(xg, wg).backward(g)  # noqa: E731
    torch_w = lambda: F.rms_norm(xg, (1024,), wg).backward(g)  # noqa: E731
    return [
        ("(2 * x).backward(g), native", native),
        ("the same, backward on the calling thread", on_caller(native)),
        ("the same through a Python Function", python),
        ("Python Function, backward on the calling thread", on_caller(python)),
        ("rms_norm forward under autograd, no backward", lambda: aiter_dist.rms_norm(xg, w)),
        ("rms_norm fwd+bwd", ours),
        ("rms_norm fwd+bwd, backward on the calling thread", on_caller(ours)),
        ("rms_norm fwd+bwd via autograd.grad", lambda: torch.autograd.grad(
            aiter_dist.rms_norm(xg, w), xg, g)),
        ("rms_norm fwd+bwd, weight grad too", ours_w),
        ("F.rms_norm fwd+bwd, weight grad too", torch_w),
        ("F.rms_norm fwd+bwd, weight grad, calling thread", on_caller(torch_w)),
    ]


def backward_body_rows():
    """The Python time inside RMSNormFunction.backward itself, on the engine's thread and on
    the calling thread: whether a backward on the engine's thread is slower in our own code
    (allocator, launcher) or around it (the hand-off)."""
    from aiter_dist.kernels import rmsnorm as RN

    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    real = RN.RMSNormFunction.backward
    spent = []

    def timed(ctx, dy):
        t0 = time.perf_counter()
        out = real(ctx, dy)
        spent.append(time.perf_counter() - t0)
        return out

    rows = []
    RN.RMSNormFunction.backward = staticmethod(timed)
    try:
        for where, threads in (("engine's thread", True), ("calling thread", False)):
            with torch.autograd.set_multithreading_enabled(threads):
                for _ in range(50):
                    aiter_dist.rms_norm(x, w).backward(g)
                torch.cuda.synchronize()
                spent.clear()
                for _ in range(N):
                    aiter_dist.rms_norm(x, w).backward(g)
                torch.cuda.synchronize()
            rows.append((f"RMSNormFunction.backward's body, {where}",
                         statistics.median(spent) * 1e6))
    finally:
        RN.RMSNormFunction.backward = real
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--trace", nargs="+", default=())
    ap.add_argument("--autograd", action="store_true")
    args = ap.parse_args()
    if args.floor:
        rows = [(name, host_us(fn)) for name, fn in floor_rows()]
        emit("Host us of the pieces of a call", ["piece", "us"], rows,
             {r[0]: round(r[1], 2) for r in rows}, "bench_overhead_floor.md")
    if args.autograd:
        rows = [(name, host_us(fn)) for name, fn in autograd_rows()] + backward_body_rows()
        emit("Host us of forward+backward through autograd", ["call", "us"], rows,
             {r[0]: round(r[1], 2) for r in rows}, "bench_overhead_autograd.md")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    aiter_dist.init_distributed()
    table, summary = [], {}
    for name, ours, base in cases():
        if args.trace:
            if name.startswith(tuple(args.trace)):
                trace(name, ours, base)
            continue
        us = host_us(ours)
        base_us = host_us(base) if base else None
        table.append((name, us, base_us if base_us else "-",
                      us / base_us if base_us else "-",
                      aiter_dist.last_path(_RECORDED_AS.get(name.split()[0], name.split()[0]))))
        summary[name] = {"ours_us": round(us, 2), "base_us": round(base_us, 2) if base_us else None}
        if args.profile and base is not None:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(N):
                ours()
            prof.disable()
            torch.cuda.synchronize()
            print(f"===== {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(24)
    if args.trace:
        return
    emit("Host time per eager call (us): ours vs PyTorch", ["op", "ours", "PyTorch", "ratio",
                                                            "our path"], table, summary,
         "bench_overhead.md")


if __name__ == "__main__":
    main()
