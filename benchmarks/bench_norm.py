"""RMSNorm and add+RMSNorm: aiter_dist vs F.rms_norm (eager) vs torch.compile, one process.

Memory-bound ops, so the figure of merit is bytes moved over time against the measured copy
bandwidth. Bytes counted (bf16 = 2 B/element, weight and statistics ignored):
  rms_norm fwd: read x, write y                          = 2 passes of M*N
  add_rms_norm fwd: read x, r, write y, residual_out     = 4 passes
  fwd+bwd adds: read x (or residual_out), dy, write dx   = +3 passes (+1 for the fused op's
  incoming residual gradient). Forward+backward is timed under CUDA-graph replay (GPU time).

    python benchmarks/bench_norm.py [--shapes 16384x4096,32768x8192] [--sweep]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

import aiter_dist
from aiter_dist.kernels import rmsnorm as K
from common import capture_graph, copy_bandwidth_tbps, emit


def eager_rms(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def eager_add_rms(x, r, w, eps=1e-6):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, eps), s


def ref_rms(x, w, eps=1e-6):  # what torch.compile fuses: fp32 statistics, like ours
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def ref_add_rms(x, r, w, eps=1e-6):
    s = x + r
    return ref_rms(s, w, eps), s


def bench(fn, grad_outputs=None, inputs=()):
    """Median ms. Forward: do_bench. Forward+backward: CUDA-graph replay of one
    forward + autograd.grad, so host-side autograd overhead (which varied 2x between runs of the
    same code on a shared host) stays out of a GPU-time comparison."""
    if grad_outputs is None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def step():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, list(inputs), grad_outputs[:len(outs)],
                                   allow_unused=True)
    return triton.testing.do_bench(capture_graph(step).replay, warmup=25, rep=100,
                                   return_mode="median")


def dw_sum(shapes):
    """GPU time of the backward's last step, the programs' fp32 partial dweights summed and
    rounded to bf16: ``_dw_reduce_kernel`` (one launch) against ``sum(0)`` + ``.to`` (two)."""
    rows = []
    for shape in shapes.split(","):
        M, N = map(int, shape.split("x"))
        programs = min(K._bwd_config(M, N, torch.device("cuda"), K.ONE_PASS_MAX_N)[0], M)
        part = torch.randn(programs, N, device="cuda")
        ours = triton.testing.do_bench(lambda: K._dw_sum(part, torch.bfloat16, False),
                                       warmup=25, rep=100, return_mode="median")
        base = triton.testing.do_bench(lambda: part.sum(0).to(torch.bfloat16), warmup=25,
                                       rep=100, return_mode="median")
        torch.testing.assert_close(K._dw_sum(part, torch.bfloat16, False)[0].float(),
                                   part.sum(0).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        rows.append((f"{M}x{N}", f"{programs}x{N}", ours * 1e3, base * 1e3, base / ours))
    emit("RMSNorm backward's dweight sum (fp32 partials to bf16)",
         ["x", "partials", "one kernel us", "sum + cast us", "speedup"], rows,
         {r[0]: r[2:] for r in rows}, "bench_norm_dw_sum.md")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16384x4096,32768x8192")
    ap.add_argument("--sweep", action="store_true", help="also time forward block configs")
    ap.add_argument("--dw-sum", action="store_true",
                    help="only the backward's dweight sum: our one kernel against sum + cast")
    args = ap.parse_args()
    if args.dw_sum:
        return dw_sum(args.shapes)
    ceiling = copy_bandwidth_tbps()
    dtype = torch.bfloat16
    comp_rms = torch.compile(ref_rms, dynamic=False)
    comp_add = torch.compile(ref_add_rms, dynamic=False)
    rows, summary = [], {"copy_TBps": ceiling, "results": {}}
    for shape in args.shapes.split(","):
        M, N = map(int, shape.split("x"))
        x = torch.randn(M, N, device="cuda", dtype=dtype)
        r = torch.randn_like(x)
        w = torch.randn(N, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        dres = torch.randn_like(x)
        pass_bytes = M * N * 2
        variants = {
            ("rms_norm", "fwd", 2): {
                "ours": lambda: aiter_dist.rms_norm(x, w),
                "F.rms_norm": lambda: eager_rms(x, w),
                "torch.compile": lambda: comp_rms(x, w)},
            ("add_rms_norm", "fwd", 4): {
                "ours": lambda: aiter_dist.add_rms_norm(x, r, w),
                "eager": lambda: eager_add_rms(x, r, w),
                "torch.compile": lambda: comp_add(x, r, w)},
        }
        xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))
        variants[("rms_norm", "fwd+bwd", 5)] = {
            "ours": lambda: aiter_dist.rms_norm(xg, wg),
            "F.rms_norm": lambda: eager_rms(xg, wg),
            "torch.compile": lambda: comp_rms(xg, wg)}
        variants[("add_rms_norm", "fwd+bwd", 8)] = {
            "ours": lambda: aiter_dist.add_rms_norm(xg, rg, wg),
            "eager": lambda: eager_add_rms(xg, rg, wg),
            "torch.compile": lambda: comp_add(xg, rg, wg)}
        for (op, kind, passes), fns in variants.items():
            grads = (dy, dres) if kind == "fwd+bwd" else None
            inputs = (xg, rg, wg) if op == "add_rms_norm" else (xg, wg)
            times = {name: bench(fn, grads, inputs) for name, fn in fns.items()}
            base = times["torch.compile"]
            tbps = passes * pass_bytes / (times["ours"] * 1e-3) / 1e12
            other = [k for k in times if k not in ("ours", "torch.compile")][0]
            rows.append((f"{op} {kind}", f"{M}x{N}", times["ours"] * 1e3, times[other] * 1e3,
                         base * 1e3, base / times["ours"], tbps, 100 * tbps / ceiling))
            summary["results"][f"{op} {kind} {M}x{N}"] = {k: v * 1e3 for k, v in times.items()}
        if args.sweep:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            rstd = K.rms_norm_fwd(x, w)[2]
            for mult in (4, 8, 16):
                for block_m in (1, 2, 4):
                    for warps in (4, 8, 16):
                        cfg = (sms * mult, block_m, triton.next_power_of_2(N), 1, warps)
                        ms = triton.testing.do_bench(
                            lambda: K.rms_norm_bwd(dy, x, w, rstd, config=cfg), warmup=25,
                            rep=100, return_mode="median")
                        print(f"sweep bwd {M}x{N} programs={sms}*{mult} BLOCK_M={block_m} "
                              f"warps={warps}: {ms * 1e3:.1f} us, "
                              f"{3 * pass_bytes / (ms * 1e-3) / 1e12:.2f} TB/s")
            for block_m in (1, 2, 4):
                for warps in (4, 8):
                    cfg = (block_m, triton.next_power_of_2(N), 1, warps)
                    ms = triton.testing.do_bench(lambda: K.rms_norm_fwd(x, w, 1e-6, config=cfg),
                                                 warmup=25, rep=100, return_mode="median")
                    print(f"sweep fwd {M}x{N} BLOCK_M={block_m} warps={warps}: "
                          f"{ms * 1e3:.1f} us, "
                          f"{2 * pass_bytes / (ms * 1e-3) / 1e12:.2f} TB/s")
    emit("RMSNorm (bf16)", ["op", "shape", "ours us", "eager us", "compile us",
                            "ours / compile speed", "ours TB/s", "% of copy"],
         rows, summary, "bench_norm.md")


if __name__ == "__main__":
    main()
