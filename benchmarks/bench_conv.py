"""conv2d: our Triton forward / dgrad / wgrad against cuDNN, bf16, channels_last, one process.

  forward   aiter_dist conv2d_fwd          vs F.conv2d
  dgrad     conv2d_dgrad                   vs aten.convolution_backward(output_mask=[dx])
  wgrad     conv2d_wgrad                   vs aten.convolution_backward(output_mask=[dw])

Shapes: every distinct convolution of torchvision's ResNet-50 (v1.5: the stride on the 3x3),
the 7x7 stem included, at batch 32 and 128. TFLOP/s count 2*N*OH*OW*C_out*(C_in/groups)*KH*KW
for each pass; "% peak" is against the H200's dense bf16 peak (989 TFLOP/s); "speed" is cuDNN
time / our time (above 1: ours is faster), both timed as CUDA-graph replays (GPU time); the
"eager" columns time plain calls, where a short kernel shows the host's cost per call instead.
Input, weight and dy are channels_last.

    python benchmarks/bench_conv.py [--quick] [--batch 32,128] [--passes fwd,dgrad,wgrad]

--quick: three shapes (the stem, a layer1 3x3, a layer3 1x1) at batch 32. --tune: time each
pass over a list of tile configs (the built-in choice first) and keep the fastest. The last line
is one JSON object; ``"tuned"`` holds the per-shape winners and ``"tuned_configs"`` the winning
configs in the form of ``kernels/conv_tuned.py``.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
import triton

import aiter_dist
from aiter_dist.kernels import conv as C
from aiter_dist.kernels._runtime import clear_plans
from aiter_dist.kernels.gemm import GemmConfig
from common import emit, env_header

PEAK_TFLOPS = 989.0
PASSES = ("fwd", "dgrad", "wgrad")

# (name, C_in, H (= W), C_out, kernel, stride, padding)
RESNET50 = [
    ("stem", 3, 224, 64, 7, 2, 3),
    ("l1.1x1a", 64, 56, 64, 1, 1, 0),
    ("l1.3x3", 64, 56, 64, 3, 1, 1),
    ("l1.1x1b", 64, 56, 256, 1, 1, 0),
    ("l1.1x1c", 256, 56, 64, 1, 1, 0),
    ("l2.1x1a", 256, 56, 128, 1, 1, 0),
    ("l2.3x3s2", 128, 56, 128, 3, 2, 1),
    ("l2.down", 256, 56, 512, 1, 2, 0),
    ("l2.1x1b", 128, 28, 512, 1, 1, 0),
    ("l2.1x1c", 512, 28, 128, 1, 1, 0),
    ("l2.3x3", 128, 28, 128, 3, 1, 1),
    ("l3.1x1a", 512, 28, 256, 1, 1, 0),
    ("l3.3x3s2", 256, 28, 256, 3, 2, 1),
    ("l3.down", 512, 28, 1024, 1, 2, 0),
    ("l3.1x1b", 256, 14, 1024, 1, 1, 0),
    ("l3.1x1c", 1024, 14, 256, 1, 1, 0),
    ("l3.3x3", 256, 14, 256, 3, 1, 1),
    ("l4.1x1a", 1024, 14, 512, 1, 1, 0),
    ("l4.3x3s2", 512, 14, 512, 3, 2, 1),
    ("l4.down", 1024, 14, 2048, 1, 2, 0),
    ("l4.1x1b", 512, 7, 2048, 1, 1, 0),
    ("l4.1x1c", 2048, 7, 512, 1, 1, 0),
    ("l4.3x3", 512, 7, 512, 3, 1, 1),
]
QUICK = ("stem", "l1.3x3", "l3.1x1c")


def bench(fn, rep, graph=True):
    """Median ms of ``fn``: replayed from a CUDA graph (GPU time alone: an eager loop of short
    kernels measures the host's launch cost instead), or eagerly."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def timed(fn, rep, graph=True):
    """(median ms, "") or (None, the error's first line)."""
    try:
        fn()
        torch.cuda.synchronize()
        return bench(fn, rep, graph), ""
    except Exception as e:  # noqa: BLE001  (a kernel that fails to compile is reported)
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:80]}"


def problems(batch, cin, hw, cout, k, s, p, passes):
    """(pass, ours(), cudnn(), path op) for one conv."""
    dev, bf16, cl = "cuda", torch.bfloat16, torch.channels_last
    x = torch.randn(batch, cin, hw, hw, device=dev, dtype=bf16).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device=dev, dtype=bf16) / (cin * k * k) ** 0.5
         ).contiguous(memory_format=cl)
    stride, pad, dil = (s, s), (p, p, p, p), (1, 1)
    y = F.conv2d(x, w, None, s, p)
    dy = torch.randn_like(y)
    bwd = torch.ops.aten.convolution_backward
    table = {
        "fwd": (lambda cfg=None: C.conv2d_fwd(x, w, None, stride, pad, dil, 1, config=cfg),
                lambda: F.conv2d(x, w, None, s, p), "conv2d"),
        "dgrad": (lambda cfg=None: C.conv2d_dgrad(dy, x, w, stride, pad, dil, 1, config=cfg),
                  lambda: bwd(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                              [True, False, False]), "conv2d_dgrad"),
        "wgrad": (lambda cfg=None: C.conv2d_wgrad(dy, x, w, stride, pad, dil, 1, config=cfg),
                  lambda: bwd(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                              [False, True, False]), "conv2d_wgrad"),
    }
    flop = 2 * batch * y.shape[2] * y.shape[3] * cout * cin * k * k
    geom = C.conv_geometry(x.shape, w.shape, stride, pad, dil, 1)
    return [(ps, *table[ps]) for ps in passes], flop, geom


# Tile candidates (block_m, block_n, block_k, warps, stages) for --tune.
GEMM_TILES = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
              (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
# GEMM configs (block_m, block_n, block_k, group_m, warps, stages) for 1x1 forward / dgrad.
POINTWISE_TILES = [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)]
WGRAD_TILES = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
               (128, 64, 64, 4, 3)]


def candidates(ps, g):
    """None (the built-in choice: the GEMM route for 1x1 convs, else the guessed config), GEMM
    configs for 1x1 convs, and the conv tile configs that fit the conv's channel counts."""
    cap = lambda v: max(16, triton.next_power_of_2(v))  # noqa: E731
    out = [None]
    if ps == "wgrad":
        base = C.wgrad_config(g, torch.bfloat16, torch.device("cuda")).split
        n = g.ci if g.ci >= 16 else g.KH * g.KW * g.ci
        # The TMA kernel (channels a multiple of 8) and the pointer kernel, each over the tiles.
        kernels = (None, False) if g.ci % 8 == 0 and g.co % 8 == 0 and g.groups == 1 else (False,)
        for bm, bn, bk, warps, stages in WGRAD_TILES:
            if bm > cap(g.co) or bn > cap(n):
                continue
            for split in sorted({1, max(1, base // 2), base, base * 2}):
                for tma in kernels:
                    out.append(C.ConvConfig(bm, bn, bk, warps, stages, 8, split, tma))
        return out
    if g.KH == g.KW == 1 and g.stride == (1, 1) and g.padding == (0,) * 4:
        out += [GemmConfig(*t) for t in POINTWISE_TILES]
    n_dim = g.co if ps == "fwd" else g.ci
    k_dim = (g.ci if g.ci >= 16 else g.KH * g.KW * g.ci) if ps == "fwd" else g.co
    for bm, bn, bk, warps, stages in GEMM_TILES:
        if bn <= cap(n_dim) and bk <= cap(k_dim):
            out.append(C.ConvConfig(bm, bn, bk, warps, stages, 8, 1))
    return out


def table_text(results, passes_by_key) -> str:
    """``kernels/conv_tuned.py``'s TUNED from a --tune run: per conv key and pass, (backend that
    won, our winning config or None for the built-in choice, ours us, cuDNN us)."""
    lines = [f"# {env_header()}", "TUNED = {"]
    for key, per_pass in sorted(passes_by_key.items()):
        items = []
        for ps, (label, cfg) in per_pass.items():
            r = results[f"{ps} {label}"]
            won = "triton" if r["speed"] and r["speed"] >= 1.0 else "vendor"
            us = [round(v, 1) if v else None for v in (r["ours_us"], r["cudnn_us"])]
            items.append(f'"{ps}": ("{won}", {cfg!r}, {us[0]}, {us[1]})')
        lines.append(f'    "{key}": {{{", ".join(items)}}},')
    return "\n".join(lines + ["}", ""])


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 shapes at batch 32")
    ap.add_argument("--batch", default="32,128")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per timing")
    ap.add_argument("--tune", action="store_true", help="time several tile configs per pass")
    ap.add_argument("--tune-rep", type=int, default=10, help="do_bench rep (ms) per candidate")
    args = ap.parse_args()
    if args.tune:   # start from the built-in choices, not the table being remade
        C.TUNED_CONFIGS.clear()
        C._configs.clear()
        clear_plans()  # (conv2d's plans were made with the tables as they were)
    passes = args.passes.split(",")
    batches = [32] if args.quick else [int(b) for b in args.batch.split(",")]
    shapes = [s for s in RESNET50 if not args.quick or s[0] in QUICK]
    rows, results, tuned, tuned_configs, by_key = [], {}, {}, {}, {}
    configs = {"fwd": C.fwd_config, "dgrad": C.dgrad_config, "wgrad": C.wgrad_config}
    for batch in batches:
        for name, cin, hw, cout, k, s, p in shapes:
            runs, flop, geom = problems(batch, cin, hw, cout, k, s, p, passes)
            label = f"{name} n{batch} {cin}x{hw}x{hw}->{cout} k{k}s{s}"
            key = C.conv_key(geom, torch.bfloat16)
            for ps, ours, cudnn, op in runs:
                default_ms, err = timed(ours, args.rep)
                path = aiter_dist.last_path(op)
                best_ms, best_cfg = default_ms, None
                if args.tune:
                    for cfg in candidates(ps, geom)[1:]:
                        ms, _ = timed(lambda: ours(cfg), args.tune_rep)
                        if ms and (best_ms is None or ms < best_ms):
                            best_ms, best_cfg = ms, cfg
                    if best_cfg is not None:   # re-time the winner at the full rep
                        best_ms, _ = timed(lambda: ours(best_cfg), args.rep)
                        path = aiter_dist.last_path(op)
                cudnn_ms, cerr = timed(cudnn, args.rep)
                eager_ms, _ = timed(lambda: ours(best_cfg), args.rep, graph=False)
                cudnn_eager_ms, _ = timed(cudnn, args.rep, graph=False)
                tf = (lambda ms: flop / (ms * 1e-3) / 1e12 if ms else None)
                speed = cudnn_ms / best_ms if best_ms and cudnn_ms else None
                cfg = best_cfg or (path.startswith("triton-gemm") and "gemm") or tuple(
                    C._config(ps, configs[ps], geom, torch.bfloat16, torch.device("cuda")))
                rows.append((label, ps, best_ms * 1e3 if best_ms else f"error: {err}",
                             default_ms * 1e3 if default_ms else "-",
                             cudnn_ms * 1e3 if cudnn_ms else f"error: {cerr}",
                             tf(best_ms) or "-", tf(cudnn_ms) or "-",
                             100 * tf(best_ms) / PEAK_TFLOPS if best_ms else "-",
                             speed or "-", eager_ms and eager_ms * 1e3,
                             cudnn_eager_ms and cudnn_eager_ms * 1e3, path, str(cfg)))
                print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                 for v in rows[-1]), flush=True)   # progress
                results[f"{ps} {label}"] = {"ours_us": best_ms and best_ms * 1e3,
                                            "default_us": default_ms and default_ms * 1e3,
                                            "cudnn_us": cudnn_ms and cudnn_ms * 1e3,
                                            "eager_us": eager_ms and eager_ms * 1e3,
                                            "cudnn_eager_us": cudnn_eager_ms and
                                            cudnn_eager_ms * 1e3,
                                            "speed": speed, "config": cfg, "error": err or None}
                tuned.setdefault(key, {})[ps] = ("triton" if speed and speed >= 1.0
                                                 else "vendor")
                entry = None
                if best_cfg is not None:
                    entry = tuned_configs[f"{ps}|{key}"] = (("gemm", *best_cfg) if isinstance(
                        best_cfg, GemmConfig) else tuple(best_cfg))
                by_key.setdefault(key, {})[ps] = (label, entry)
            torch.cuda.empty_cache()
    summary = {"results": results, "peak_tflops": PEAK_TFLOPS,
               "geomean_speed": {ps: geomean([r["speed"] for k, r in results.items()
                                              if k.split(" ")[0] == ps]) for ps in passes},
               "tuned": tuned, "tuned_configs": tuned_configs}
    if args.tune:
        table = table_text(results, by_key)
        print("\n" + table)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_conv_tuned.py.txt"), "w") as f:
                f.write(table)
    emit("conv2d (bf16, channels_last): ours vs cuDNN" + (" (tuned)" if args.tune else ""),
         ["shape", "pass", "ours us", "ours untuned us", "cuDNN us", "ours TFLOP/s",
          "cuDNN TFLOP/s", "ours % peak", "speed (cuDNN/ours)", "ours eager us",
          "cuDNN eager us", "our path", "config"],
         rows, summary, "bench_conv_quick.md" if args.quick else
         ("bench_conv_tuned.md" if args.tune else "bench_conv.md"))


if __name__ == "__main__":
    main()
