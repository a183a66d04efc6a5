"""RoPE, SwiGLU, cross-entropy and the fused linear + cross-entropy: aiter_dist against eager
PyTorch and torch.compile of the same expression, one process, one GPU.

Memory-bound ops are measured against the copy bandwidth of this run. Bytes counted (bf16):
  rope (q and k together) fwd: read q, k, write q, k             = 2 passes of q + k
                          fwd+bwd: the backward is the same pass = 4 passes
  swiglu fwd: read gate, up, write out                           = 3 passes of M*N
         fwd+bwd: + read dy, gate, up, write dgate, dup          = 8 passes
  cross_entropy fwd: read logits                                 = 1 pass of M*V
                fwd+bwd: + read logits, write dlogits            = 3 passes
(the cos/sin tables, per-row statistics and targets are ignored: < 1% of the bytes).
Forward+backward of the memory-bound ops is timed under CUDA-graph replay (GPU time).
``linear_cross_entropy`` is compute-bound (3 GEMMs of 2*M*H*V FLOPs each) and memory-hungry:
time and peak memory above the inputs against ``F.cross_entropy(F.linear(x, w), t)``.

    python benchmarks/bench_train_ops.py [--quick] [--small-ce]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

import aiter_dist
from common import capture_graph, copy_bandwidth_tbps, emit


def do_bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd_ms(fn, inputs, graph=True):
    """Median ms of one forward + autograd.grad of every output (seeded with ones-like grads
    made once), under CUDA-graph replay unless ``graph`` is False."""
    with torch.no_grad():  # (an autograd graph kept alive here would break the capture)
        outs = fn(*inputs)
    grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
    del outs

    def step():
        o = fn(*inputs)
        o = o if isinstance(o, tuple) else (o,)
        return torch.autograd.grad(o, list(inputs), grads[:len(o)])
    return do_bench(capture_graph(step).replay if graph else step)


# ----------------------------------------------------------------------------- the expressions

def rope_torch(q, k, cos, sin):
    """Rotate-half RoPE of q and k, fp32 math: what torch.compile is given."""
    def one(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)
    return one(q), one(k)


def swiglu_torch(gate, up):
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def ce_torch(logits, target):
    return F.cross_entropy(logits.float(), target)


def linear_ce_torch(x, w, target):
    return F.cross_entropy(F.linear(x, w), target)


# ----------------------------------------------------------------------------- sections

def bench_memory_bound(rows, name, ours, torch_fn, inputs, bytes_fwd, bytes_fb, bw):
    compiled = torch.compile(torch_fn)
    for fn in (ours, torch_fn, compiled):
        fn(*inputs)  # compile / autotune outside the timing
    fwd = {k: do_bench(lambda f=f: f(*[t.detach() for t in inputs]))
           for k, f in (("ours", ours), ("eager", torch_fn), ("compile", compiled))}
    fb = {k: fwd_bwd_ms(f, inputs)
          for k, f in (("ours", ours), ("eager", torch_fn), ("compile", compiled))}
    for phase, t, nbytes in (("fwd", fwd, bytes_fwd), ("fwd+bwd", fb, bytes_fb)):
        rows.append([name, phase, t["ours"] * 1e3, t["eager"] * 1e3, t["compile"] * 1e3,
                     t["compile"] / t["ours"],
                     f"{nbytes / (t['ours'] * 1e-3) / 1e12 / bw:.0%}",
                     f"{nbytes / (t['compile'] * 1e-3) / 1e12 / bw:.0%}"])
    return {f"{name}_{p}_vs_compile": (t["compile"] / t["ours"])
            for p, t in (("fwd", fwd), ("fwd_bwd", fb))}


def peak_mem_and_ms(fn, inputs):
    """(peak bytes allocated above the inputs during one forward + backward, median ms)."""
    def step():
        loss = fn(*inputs)
        return torch.autograd.grad(loss, list(inputs))
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    return peak, do_bench(step)


SMALL_CE_BLOCKS = ((4096, 4), (16384, 8), (32768, 16))  # the one launch's (logits, warps)


def small_ce():
    """GPU time per call of a small reduced loss without autograd (an evaluation loss), under
    CUDA-graph replay of 20 calls: the one-launch kernel at each block size of SMALL_CE_BLOCKS
    (past ONE_LAUNCH_MAX_LOGITS too: where it stops paying is what this measures), the
    two-kernel path (row losses, then the reduction) and F.cross_entropy."""
    from aiter_dist.kernels import cross_entropy as K
    from aiter_dist.kernels._runtime import clear_plans

    def graph_us(fn, **settings):
        saved = {k: getattr(K, k) for k in settings}
        for k, v in settings.items():
            setattr(K, k, v)
        clear_plans()  # (a plan made under other settings would serve the call)
        try:
            graph = capture_graph(fn, 20)
        finally:
            for k, v in saved.items():
                setattr(K, k, v)
            clear_plans()
        return do_bench(graph.replay) * 1e3 / 20

    rows = []
    for t, v in ((8, 1024), (64, 1024), (16, 4096), (4, 16384), (128, 512)):
        x = torch.randn(t, v, device="cuda", dtype=torch.bfloat16)
        tgt = torch.randint(0, v, (t,), device="cuda")
        ours = lambda: aiter_dist.cross_entropy(x, tgt)  # noqa: E731
        one = [graph_us(ours, ONE_LAUNCH_BLOCK=b, ONE_LAUNCH_WARPS=w,
                        ONE_LAUNCH_MAX_LOGITS=1 << 20) for b, w in SMALL_CE_BLOCKS]
        rows.append([f"({t}, {v})", *one, graph_us(ours, ONE_LAUNCH_MAX_LOGITS=0),
                     graph_us(lambda: F.cross_entropy(x, tgt))])
    emit("Small reduced cross-entropy without autograd, GPU µs per call (graph replay)",
         ["logits", *(f"one launch, {b} logits x {w} warps" for b, w in SMALL_CE_BLOCKS),
          "two kernels", "F.cross_entropy"], rows, {r[0]: r[1:] for r in rows},
         "bench_small_ce.md")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    p.add_argument("--small-ce", action="store_true",
                   help="only the small reduced cross-entropy (one launch vs two kernels)")
    args = p.parse_args()
    if args.small_ce:
        return small_ce()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    bw = copy_bandwidth_tbps()
    rows, summary = [], {"copy_tbps": bw}
    b, s, hq, hk, d = (2, 512, 32, 8, 128) if args.quick else (8, 2048, 32, 8, 128)

    # RoPE: q and k of a Llama-3-8B layer, rotate-half, fp32 tables (s, d / 2).
    q = torch.randn(b, s, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=dev, dtype=dt, requires_grad=True)
    ang = torch.rand(s, d // 2, device=dev) * 6.28
    cos, sin = ang.cos(), ang.sin()
    nqk = (q.numel() + k.numel()) * 2
    summary.update(bench_memory_bound(
        rows, f"rope q{tuple(q.shape)} k{tuple(k.shape)}",
        lambda q, k: aiter_dist.apply_rotary_emb_qk(q, k, cos, sin),
        lambda q, k: rope_torch(q, k, cos, sin), (q, k), 2 * nqk, 4 * nqk, bw))

    # SwiGLU at Llama-3-8B's MLP width.
    m, n = (4096, 14336) if not args.quick else (1024, 4096)
    gate = torch.randn(m, n, device=dev, dtype=dt, requires_grad=True)
    up = torch.randn(m, n, device=dev, dtype=dt, requires_grad=True)
    nb = m * n * 2
    summary.update(bench_memory_bound(rows, f"swiglu ({m}, {n})", aiter_dist.swiglu,
                                      swiglu_torch, (gate, up), 3 * nb, 8 * nb, bw))
    del gate, up

    # Cross-entropy over Llama-3's vocabulary.
    t, v = (4096, 128256) if not args.quick else (1024, 32000)
    logits = torch.randn(t, v, device=dev, dtype=dt, requires_grad=True)
    target = torch.randint(0, v, (t,), device=dev)
    nb = t * v * 2
    summary.update(bench_memory_bound(
        rows, f"cross_entropy ({t}, {v})", lambda x: aiter_dist.cross_entropy(x, target),
        lambda x: ce_torch(x, target), (logits,), nb, 3 * nb, bw))
    del logits
    emit("Training ops (memory-bound), µs", ["op", "phase", "ours µs", "eager µs",
                                             "compile µs", "compile / ours", "ours % copy BW",
                                             "compile % copy BW"],
         rows, summary, "bench_train_ops.md")

    # Fused linear + cross-entropy: time and memory.
    t, h, v = (8192, 4096, 128256) if not args.quick else (2048, 1024, 32000)
    x = torch.randn(t, h, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(v, h, device=dev, dtype=dt) * h ** -0.5).requires_grad_()
    target = torch.randint(0, v, (t,), device=dev)
    peak_ref, ms_ref = peak_mem_and_ms(lambda x, w: linear_ce_torch(x, w, target), (x, w))
    peak_ours, ms_ours = peak_mem_and_ms(
        lambda x, w: aiter_dist.linear_cross_entropy(x, w, target), (x, w))
    flops = 3 * 2 * t * h * v
    lrows = [[f"({t}, {h}) x ({v}, {h})", ms_ours, ms_ref, ms_ref / ms_ours,
              flops / (ms_ours * 1e-3) / 1e12, peak_ours / 2**30, peak_ref / 2**30,
              peak_ours / peak_ref]]
    lsum = {"linear_ce_time_vs_torch": ms_ref / ms_ours, "linear_ce_mem_ratio": peak_ours / peak_ref,
            "linear_ce_ms": ms_ours, "torch_ms": ms_ref}
    emit("linear_cross_entropy forward + backward (bf16)",
         ["x @ w.T", "ours ms", "F.linear+F.cross_entropy ms", "speedup", "ours TFLOP/s",
          "ours peak GiB", "torch peak GiB", "memory ratio"], lrows, lsum,
         "bench_linear_ce.md")


if __name__ == "__main__":
    main()
