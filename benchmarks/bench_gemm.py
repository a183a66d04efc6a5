"""GEMM: our Triton kernels against the vendor's, one process.

  bf16 linear, x (M, K) and w (N, K): fwd x @ w.T vs F.linear (cuBLAS), dgrad dy @ w and wgrad
  dy.T @ x vs torch.matmul; fp8 e4m3 gemm_a8w8 (per-token x per-channel scales) vs
  torch._scaled_mm rowwise; gemm_a8w8_blockscale (1x128 x 128x128 block scales) vs
  torch._scaled_mm blockwise (a failure of that baseline is reported in the table). TFLOP/s count
  2*M*N*K; "speed" is vendor time / our time (above 1: ours is faster). Our kernel runs with the
  config the dispatch would pick (the tuned table's, else the built-in default).

    python benchmarks/bench_gemm.py [--shapes 8192x8192x8192,...] [--ops fwd,dgrad,fp8,...]
    python benchmarks/bench_gemm.py --sweep [--shapes ...] [--ops ...]

--sweep times several configs of ours per shape class (``kernels/gemm.py``: ``shape_class``)
and prints, before the results table, ``TUNED = {...}`` in the form of ``kernels/gemm_tuned.py``
(also written to $OUT/bench_gemm_tuned.py.txt): each class's best config, the winner against
the vendor, and both TFLOP/s. Shapes (M, N, K) default to Llama-style layers: 8B and 70B
projections, their TP=2 shards, 8192^3 and the 128256-token vocabulary head.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
import triton

import aiter_dist
from aiter_dist.kernels import gemm as G
from aiter_dist.kernels import gemm_fp8 as Q
from common import emit, env_header

SHAPES = ("8192x8192x8192,16384x4096x4096,16384x14336x4096,16384x4096x14336,16384x7168x4096,"
          "16384x4096x7168,4096x28672x4096,4096x4096x28672,2048x4096x4096,16384x128256x4096")
OPS = ("fwd", "dgrad", "wgrad", "fp8", "fp8-block")

# Configs the sweep tries per kind (GemmConfig fields: block_m, block_n, block_k, group_m, warps,
# stages, flatten, subtile). Those that do not fit shared memory fail to launch and are skipped.
SWEEP = {
    "bf16": [(128, 256, 64, 8, 8, 3, True, False), (128, 256, 64, 8, 8, 4, True, True),
             (128, 256, 64, 8, 8, 3, False, False), (128, 256, 64, 16, 8, 3, True, False),
             (256, 128, 64, 8, 8, 3, True, False), (128, 128, 64, 8, 8, 4, True, False),
             (128, 128, 64, 8, 4, 4, True, False), (64, 256, 64, 8, 4, 4, True, False)],
    "fp8": [(128, 256, 128, 8, 8, 3, True, False), (128, 256, 128, 8, 8, 4, True, True),
            (128, 256, 128, 8, 8, 3, False, False), (256, 128, 128, 8, 8, 3, True, False),
            (128, 128, 128, 8, 8, 4, True, False), (128, 128, 128, 8, 4, 4, True, False)],
    "fp8-block": [(128, 128, 128, 8, 8, 4, True, False), (128, 128, 128, 8, 8, 3, True, False),
                  (128, 128, 128, 8, 8, 4, False, False), (128, 128, 128, 8, 4, 4, True, False),
                  (64, 128, 128, 8, 4, 4, True, False), (128, 256, 128, 8, 8, 3, True, False)],
}


def bench(fn, rep):
    return triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def tflops(M, N, K, ms):
    return 2 * M * N * K / (ms * 1e-3) / 1e12


def problems(M, N, K, ops):
    """(op, table key, kind, ours(config), vendor(), path record) for one (M, N, K)."""
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=bf16)
    w = torch.randn(N, K, device=dev, dtype=bf16) / K ** 0.5
    out = []
    if {"fwd", "dgrad", "wgrad"} & set(ops):
        dy = torch.randn(M, N, device=dev, dtype=bf16)
        passes = {"fwd": ("nt", (M, N, K), lambda c: G.matmul(x, w.t(), config=c),
                          lambda: F.linear(x, w)),
                  "dgrad": ("nn", (M, K, N), lambda c: G.matmul(dy, w, config=c),
                            lambda: dy @ w),
                  "wgrad": ("tn", (N, K, M), lambda c: G.matmul(dy.t(), x, config=c),
                            lambda: dy.t() @ x)}
        for op in ("fwd", "dgrad", "wgrad"):
            if op in ops:
                layout, mnk, ours, vendor = passes[op]
                out.append((op, G.shape_class(layout, "bf16", *mnk), "bf16", ours, vendor,
                            "matmul"))
    if "fp8" in ops:
        xq, xs = Q.quantize_per_token_fp8(x)
        wq, ws = Q.quantize_per_token_fp8(w)
        ws = ws.t().contiguous()
        out.append(("fp8", G.shape_class("nt", "fp8", M, N, K), "fp8",
                    lambda c: Q.gemm_a8w8_fwd(xq, wq, xs, ws, config=c, backend="triton"),
                    lambda: Q.scaled_mm_rowwise(xq, wq, xs, ws), "gemm_a8w8"))
    if "fp8-block" in ops:
        bxq, bxs = Q.quantize_per_block_fp8(x, (1, 128))
        bwq, bws = Q.quantize_per_block_fp8(w, (128, 128))
        out.append(("fp8-block", G.shape_class("nt", "fp8-block", M, N, K), "fp8-block",
                    lambda c: Q.gemm_a8w8_blockscale_fwd(bxq, bwq, bxs, bws, config=c,
                                                         backend="triton"),
                    lambda: Q.scaled_mm_blockwise(bxq, bwq, bxs, bws), "gemm_a8w8_blockscale"))
    return out


def time_vendor(vendor, rep):
    """Median ms, or the error's first line when the baseline refuses the shape."""
    try:
        vendor()
        return bench(vendor, rep), ""
    except Exception as e:  # noqa: BLE001  (torch raises several types for unsupported shapes)
        return None, str(e).strip().splitlines()[0][:80]


def time_config(ours, config, rep):
    try:
        ours(config)
        return bench(lambda: ours(config), rep)
    except Exception as e:  # a config that does not fit (shared memory, registers): skip it
        print(f"  skip {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxNxK")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per timing")
    ap.add_argument("--sweep", action="store_true", help="time the SWEEP configs per class")
    args = ap.parse_args()
    ops = args.ops.split(",")
    rows, results, per_class = [], {}, {}
    for shape in args.shapes.split(","):
        M, N, K = map(int, shape.split("x"))
        for op, key, kind, ours, vendor, record in problems(M, N, K, ops):
            m, n, k = {"dgrad": (M, K, N), "wgrad": (N, K, M)}.get(op, (M, N, K))
            vendor_ms, failure = time_vendor(vendor, args.rep)
            if args.sweep:
                # A class's totals over its shapes: vendor ms, each config's ms, flops.
                cls = per_class.setdefault(key, {"vendor": [], "configs": {}, "flop": 0.0})
                cls["vendor"].append(vendor_ms)
                cls["flop"] += 2 * m * n * k
                for config in SWEEP[kind]:
                    ms = time_config(ours, config, max(args.rep // 2, 20))
                    if ms is not None:
                        print(f"sweep {op} {M}x{N}x{K} {config}: {tflops(m, n, k, ms):.0f} "
                              f"TFLOP/s")
                    total = cls["configs"].get(config, 0.0)
                    cls["configs"][config] = total + ms if ms is not None else math.inf
            ours_ms = bench(lambda: ours(None), args.rep)
            path = aiter_dist.last_path(record)
            speed = vendor_ms / ours_ms if vendor_ms else None
            rows.append((op, f"{M}x{N}x{K}", ours_ms * 1e3,
                         vendor_ms * 1e3 if vendor_ms else f"failed: {failure}",
                         tflops(m, n, k, ours_ms), tflops(m, n, k, vendor_ms) if vendor_ms else "-",
                         speed if speed else "-", path))
            results[f"{op} {M}x{N}x{K}"] = {"ours_us": ours_ms * 1e3, "path": path,
                                           "vendor_us": vendor_ms * 1e3 if vendor_ms else None,
                                           "speed": speed}
        torch.cuda.empty_cache()
    summary = {"results": results,
               "geomean_speed": {op: geomean([r["speed"] for k, r in results.items()
                                              if k.split(" ")[0] == op]) for op in ops},
               "targets": {"fwd": 0.9, "dgrad": 0.9, "wgrad": 0.9, "fp8": 1.0, "fp8-block": 1.0}}
    if args.sweep:
        tuned = {}
        for key, cls in sorted(per_class.items()):
            config, ms = min(cls["configs"].items(), key=lambda kv: kv[1])
            if ms == math.inf:
                continue
            vendor = sum(cls["vendor"]) if all(cls["vendor"]) else None  # None: it failed
            entry = {"config": config, "winner": "triton" if not vendor or ms <= vendor
                     else "vendor", "triton_tflops": round(cls["flop"] / ms / 1e9, 1),
                     "vendor_tflops": round(cls["flop"] / vendor / 1e9, 1) if vendor else None}
            tuned[key] = entry
        table = f"# {env_header()}\nTUNED = {{\n" + "".join(
            f'    "{key}": {{"config": {e["config"]}, "winner": "{e["winner"]}", '
            f'"triton_tflops": {e["triton_tflops"]}, "vendor_tflops": {e["vendor_tflops"]}}},\n'
            for key, e in tuned.items()) + "}\n"
        print("\n" + table)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_gemm_tuned.py.txt"), "w") as f:
                f.write(table)
        summary["sweep"] = {k: dict(v, config=list(v["config"])) for k, v in tuned.items()}
    emit("GEMM: ours vs cuBLAS / torch._scaled_mm", ["op", "MxNxK", "ours us", "vendor us",
                                                     "ours TFLOP/s", "vendor TFLOP/s",
                                                     "speed (vendor/ours)", "our path"],
         rows, summary, "bench_gemm_sweep.md" if args.sweep else "bench_gemm.md")


if __name__ == "__main__":
    main()
