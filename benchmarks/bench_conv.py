"""conv2d: our Triton forward / dgrad / wgrad against cuDNN, bf16, channels_last, one process.

  forward   aiter_dist conv2d_fwd          vs F.conv2d
  dgrad     conv2d_dgrad                   vs aten.convolution_backward(output_mask=[dx])
  wgrad     conv2d_wgrad                   vs aten.convolution_backward(output_mask=[dw])

Shapes: every distinct convolution of torchvision's ResNet-50 (v1.5: the stride on the 3x3),
the 7x7 stem included, at batch 32 and 128. TFLOP/s count 2*N*OH*OW*C_out*(C_in/groups)*KH*KW
for each pass; "% peak" is against the H200's dense bf16 peak (989 TFLOP/s); "speed" is cuDNN
time / our time (above 1: ours is faster). Input, weight and dy are channels_last.

    python benchmarks/bench_conv.py [--quick] [--batch 32,128] [--passes fwd,dgrad,wgrad]

--quick: three shapes (the stem, a layer1 3x3, a layer3 1x1) at batch 32. The last line is one
JSON object; ``"tuned"`` holds the per-shape winners in the form of ``kernels/conv.py``'s TUNED.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton

import aiter_dist
from aiter_dist.kernels import conv as C
from common import emit

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


def bench(fn, rep):
    return triton.testing.do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def timed(fn, rep):
    """(median ms, "") or (None, the error's first line)."""
    try:
        fn()
        torch.cuda.synchronize()
        return bench(fn, rep), ""
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
        "fwd": (lambda: C.conv2d_fwd(x, w, None, stride, pad, dil, 1),
                lambda: F.conv2d(x, w, None, s, p), "conv2d"),
        "dgrad": (lambda: C.conv2d_dgrad(dy, x, w, stride, pad, dil, 1),
                  lambda: bwd(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                              [True, False, False]), "conv2d_dgrad"),
        "wgrad": (lambda: C.conv2d_wgrad(dy, x, w, stride, pad, dil, 1),
                  lambda: bwd(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                              [False, True, False]), "conv2d_wgrad"),
    }
    flop = 2 * batch * y.shape[2] * y.shape[3] * cout * cin * k * k
    geom = C.conv_geometry(x.shape, w.shape, stride, pad, dil, 1)
    return [(ps, *table[ps]) for ps in passes], flop, geom


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 shapes at batch 32")
    ap.add_argument("--batch", default="32,128")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per timing")
    args = ap.parse_args()
    passes = args.passes.split(",")
    batches = [32] if args.quick else [int(b) for b in args.batch.split(",")]
    shapes = [s for s in RESNET50 if not args.quick or s[0] in QUICK]
    rows, results, tuned = [], {}, {}
    configs = {"fwd": C.fwd_config, "dgrad": C.dgrad_config, "wgrad": C.wgrad_config}
    for batch in batches:
        for name, cin, hw, cout, k, s, p in shapes:
            runs, flop, geom = problems(batch, cin, hw, cout, k, s, p, passes)
            label = f"{name} n{batch} {cin}x{hw}x{hw}->{cout} k{k}s{s}"
            for ps, ours, cudnn, op in runs:
                ours_ms, err = timed(ours, args.rep)
                cudnn_ms, cerr = timed(cudnn, args.rep)
                tf = (lambda ms: flop / (ms * 1e-3) / 1e12 if ms else None)
                speed = cudnn_ms / ours_ms if ours_ms and cudnn_ms else None
                cfg = tuple(C._config(ps, configs[ps], geom, torch.bfloat16,
                                      torch.device("cuda")))
                rows.append((label, ps, ours_ms * 1e3 if ours_ms else f"error: {err}",
                             cudnn_ms * 1e3 if cudnn_ms else f"error: {cerr}",
                             tf(ours_ms) or "-", tf(cudnn_ms) or "-",
                             100 * tf(ours_ms) / PEAK_TFLOPS if ours_ms else "-",
                             speed or "-", aiter_dist.last_path(op), str(cfg)))
                results[f"{ps} {label}"] = {"ours_us": ours_ms and ours_ms * 1e3,
                                            "cudnn_us": cudnn_ms and cudnn_ms * 1e3,
                                            "speed": speed, "config": cfg, "error": err or None}
                key = C.conv_key(geom, torch.bfloat16)
                tuned.setdefault(key, {})[ps] = ("triton" if speed and speed >= 1.0
                                                 else "vendor")
            torch.cuda.empty_cache()
    summary = {"results": results, "peak_tflops": PEAK_TFLOPS,
               "geomean_speed": {ps: geomean([r["speed"] for k, r in results.items()
                                              if k.split(" ")[0] == ps]) for ps in passes},
               "tuned": tuned}
    emit("conv2d (bf16, channels_last): ours vs cuDNN",
         ["shape", "pass", "ours us", "cuDNN us", "ours TFLOP/s", "cuDNN TFLOP/s",
          "ours % peak", "speed (cuDNN/ours)", "our path", "config"],
         rows, summary, "bench_conv_quick.md" if args.quick else "bench_conv.md")


if __name__ == "__main__":
    main()
