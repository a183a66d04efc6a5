"""Flash attention: aiter_dist vs torch SDPA (cuDNN backend, flash backend), bf16, one process.

    python benchmarks/bench_attention.py [--quick]
    python benchmarks/bench_attention.py --sweep [--sweep-dims 128,64] [--sweep-kinds fwd,bwd]
    python benchmarks/bench_attention.py --gqa-split   (GQA backward: the group over programs)
    python benchmarks/bench_attention.py --small-tma   (tiny forwards: pointers or descriptors)

Shapes as in FlashAttention-3's benchmark: batch * seqlen = 16384, nheads * headdim = 2048,
seqlen 1k ... 16k, headdim 64 and 128, causal and full; plus GQA (32 q heads, 8 kv heads) and a
ragged varlen batch. TFLOP/s: forward 4*b*h*sq*sk*d (halved for causal), backward 2.5x that.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import aiter_dist
from common import emit


def flops(b, h, sq, sk, d, causal):
    f = 4 * b * h * sq * sk * d
    return f / 2 if causal else f


def time_fwd_bwd(fn, q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=10, rep=60, return_mode="median")
    out = fn(q, k, v)
    do = torch.randn_like(out)
    bwd = triton.testing.do_bench(lambda: out.backward(do, retain_graph=True), warmup=10,
                                  rep=60, grad_to_none=[q, k, v], return_mode="median")
    return fwd, bwd


def sdpa(backend, causal, gqa):
    def run(q, k, v):  # SDPA wants (b, h, s, d)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=causal,
                                               enable_gqa=gqa)
        return o.transpose(1, 2)
    return run


# Configs tried by --sweep: (BLOCK_M, BLOCK_N, warps, stages[, tma[, tma_dq]]). Forward: BLOCK_M
# queries per program, BLOCK_N keys per step. One-kernel backward: BLOCK_N keys per program,
# BLOCK_M queries per step; tma_dq: dQ added by the copy engine. A pair: the two-kernel
# backward (dK/dV, dQ). Triton 3.6's ptxas crashes on TMA forwards with 2 stages, on the dQ
# kernel with TMA and 2 stages, and on the one-kernel backward with TMA loads of Q and dO
# without a causal mask (compiled offline for sm_90), so none of those are tried.
FWD_SWEEP = {
    128: ((64, 64, 4, 3, True), (64, 32, 4, 3, True), (64, 32, 4, 4, True), (64, 64, 4, 3),
          (128, 64, 8, 3, True)),
    64: ((64, 64, 4, 3, True), (64, 64, 4, 4, True), (64, 128, 4, 3, True), (128, 64, 8, 3),
         (128, 128, 8, 3, True)),
}
BWD_SWEEP = (
    (64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 2, False, True), (64, 128, 8, 3, False, True),
    (64, 64, 4, 2, False, True), (64, 128, 8, 1, False, True), (32, 128, 8, 2, False, True),
    (64, 64, 4, 2), ((64, 128, 8, 2), (128, 64, 8, 2)), ((64, 128, 8, 2), (64, 64, 4, 3, True)),
    ((64, 64, 4, 2), (64, 64, 4, 3, True)), ((64, 128, 8, 3), (64, 64, 4, 2)),
)


# --gqa-split: backward configs for GQA (32 query heads on 8 KV heads, hd128): the default (two
# kernels), the one kernel looping over the group, and the group split over 2 and 4 programs.
GQA_SPLIT = (None, (64, 128, 8, 3, False, True), (64, 128, 8, 3, False, True, 2),
             (64, 128, 8, 3, False, True, 4), (64, 128, 8, 2, False, False, 4),
             (64, 64, 4, 2, False, True, 4))


def gqa_split(dev, dt):
    """Backward TFLOP/s of the GQA_SPLIT configs at b4 s4096 h32/8 hd128, causal and full, with
    cuDNN's beside them; rows of the table."""
    from aiter_dist.kernels import flash_attn as FA

    q, do = (torch.randn(4, 4096, 32, 128, device=dev, dtype=dt) for _ in range(2))
    k, v = (torch.randn(4, 4096, 8, 128, device=dev, dtype=dt) for _ in range(2))
    rows = []
    for causal in (True, False):
        fl = 2.5 * flops(4, 32, 4096, 4096, 128, causal)
        out, lse = FA.flash_attn_fwd(q, k, v, 128 ** -0.5, causal, (-1, -1))
        _, cudnn_bwd = time_fwd_bwd(sdpa(SDPBackend.CUDNN_ATTENTION, causal, True), q, k, v)
        for cfg in GQA_SPLIT:
            try:
                ms = triton.testing.do_bench(lambda: FA.flash_attn_bwd(
                    do, q, k, v, out, lse, 128 ** -0.5, causal, (-1, -1), config=cfg),
                    warmup=10, rep=50, return_mode="median")
                tf = fl / ms / 1e9
            except Exception as e:  # a config the compiler refuses is reported, not fatal
                print(f"gqa split {cfg}: {type(e).__name__} {str(e)[:200]}", flush=True)
                tf = float("nan")
            rows.append((f"GQA 32/8 b4 s4096 d128 {'causal' if causal else 'full'} bwd",
                         str(cfg or "default"), tf, fl / cudnn_bwd / 1e9,
                         tf / (fl / cudnn_bwd / 1e9), aiter_dist.last_path("flash_attn_bwd")))
            print(rows[-1], flush=True)
    return rows


def sweep(dev, dt, dims, kinds):
    """Time block configs at b4 s4096, nheads * headdim 2048; print the best of each kernel."""
    import time

    from aiter_dist.kernels import flash_attn as FA

    t0 = time.time()
    best = {}

    def bench(tag, fn, fl):
        try:
            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
            tf = fl / ms / 1e9
            print(f"sweep {tag}: {tf:.0f} TFLOP/s  [{time.time() - t0:.0f} s]", flush=True)
            return tf
        except Exception as e:  # a config the compiler refuses is reported, not fatal
            print(f"sweep {tag}: {type(e).__name__} {str(e)[:200]}", flush=True)
            return 0.0

    for d in dims:
        h = 2048 // d
        q, k, v, do = (torch.randn(4, 4096, h, d, device=dev, dtype=dt) for _ in range(4))
        scale = d ** -0.5
        # The backward's inputs, once per mask (default forward configs).
        saved = {causal: FA.flash_attn_fwd(q, k, v, scale, causal, (-1, -1))
                 for causal in (True, False)}
        for kind in kinds:
            configs = FWD_SWEEP[d] if kind == "fwd" else BWD_SWEEP
            for cfg in configs:
                total = 0.0
                for causal in (True, False):
                    fl = flops(4, h, 4096, 4096, d, causal)
                    if kind == "fwd":
                        total += bench(f"fwd d{d} causal={causal} {cfg}", lambda: FA.flash_attn_fwd(
                            q, k, v, scale, causal, (-1, -1), config=cfg), fl)
                    else:
                        out, lse = saved[causal]
                        total += bench(f"bwd d{d} causal={causal} {cfg}",
                                       lambda: FA.flash_attn_bwd(
                                           do, q, k, v, out, lse, scale, causal, (-1, -1),
                                           config=cfg), 2.5 * fl)
                if total > best.get((d, kind), (0.0, None))[0]:
                    best[(d, kind)] = (total, cfg)
    for (d, kind), (total, cfg) in best.items():
        print(f"sweep best {kind} d{d}: {cfg} (causal + full {total:.0f} TFLOP/s)")
    return {key: cfg for key, (_, cfg) in best.items()}


def use_configs(best):
    """Make the launchers use the sweep's best configs for the head dims swept (--then-table:
    the table then shows what those configs give, to be made the defaults)."""
    from aiter_dist.kernels import flash_attn as FA

    fwd, bwd = FA._fwd_blocks, FA._bwd_blocks

    def fwd_blocks(d, device, sq=0, sk=0):
        return best.get((d, "fwd")) or fwd(d, device, sq, sk)

    def bwd_blocks(d, device, sq=0, sk=0, deterministic=False, group=1, causal=True):
        cfg = best.get((d, "bwd"))
        if cfg is None or (deterministic and isinstance(cfg[0], int)):
            return bwd(d, device, sq, sk, deterministic, group, causal)
        return cfg

    FA._fwd_blocks, FA._bwd_blocks = fwd_blocks, bwd_blocks
    print("table configs:", best, flush=True)


def small_tma(dev, dt):
    """GPU us (graph replay) of small causal forwards with K and V through tensor descriptors
    and through pointers: where flash_attn's HOST_BOUND_SCORES bound belongs."""
    from aiter_dist.kernels import flash_attn as FA

    rows = []
    for b, s, h, d in ((1, 128, 8, 64), (1, 256, 16, 128), (2, 512, 8, 128)):
        q = torch.randn(b, s, h, d, device=dev, dtype=dt)
        for tma in (True, False):
            cfg = (64, 64, 4, 3, tma)
            ms = triton.testing.do_bench_cudagraph(
                lambda: FA.flash_attn_fwd(q, q, q, d ** -0.5, True, (-1, -1), config=cfg),
                rep=50)
            rows.append((f"b{b} s{s} h{h} d{d}", b * h * s * s, "tma" if tma else "pointers",
                         ms * 1e3))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="only time block configs at b4 s4096")
    ap.add_argument("--sweep-dims", default="128,64", help="head dims to sweep")
    ap.add_argument("--sweep-kinds", default="fwd,bwd", help="fwd, bwd or both")
    ap.add_argument("--then-table", action="store_true",
                    help="after --sweep, run the table with the best configs found")
    ap.add_argument("--gqa-split", action="store_true",
                    help="only time the GQA backward configs (GQA_SPLIT) against cuDNN")
    ap.add_argument("--small-tma", action="store_true",
                    help="only time small forwards with and without tensor descriptors")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    if args.small_tma:
        rows = small_tma(dev, dt)
        emit("Flash attention forward, small causal problems (GPU us, graph replay)",
             ["shape", "scores", "K/V through", "us"], rows, {"rows": [list(r) for r in rows]},
             "bench_attention_small.md")
        return
    if args.gqa_split:
        rows = gqa_split(dev, dt)
        emit("Flash attention backward, GQA 32/8 (TFLOP/s)",
             ["shape", "config", "ours bwd", "cuDNN bwd", "ours/cuDNN", "our path"], rows,
             {"rows": [list(r) for r in rows]}, "bench_attention_gqa_split.md")
        return
    if args.sweep:
        best = sweep(dev, dt, [int(x) for x in args.sweep_dims.split(",")],
                     args.sweep_kinds.split(","))
        if not args.then_table:
            return
        use_configs(best)
    cases = []
    for d in (128, 64):
        for s in ((2048, 8192) if args.quick else (1024, 2048, 4096, 8192, 16384)):
            for causal in (True, False):
                cases.append((16384 // s, s, 2048 // d, 2048 // d, d, causal))
    cases.append((4, 4096, 32, 8, 128, True))  # GQA
    rows, summary = [], {}
    for b, s, h, hk, d, causal in cases:
        q = torch.randn(b, s, h, d, device=dev, dtype=dt)
        k = torch.randn(b, s, hk, d, device=dev, dtype=dt)
        v = torch.randn(b, s, hk, d, device=dev, dtype=dt)
        fl = flops(b, h, s, s, d, causal)
        res = {}
        impls = {"ours": lambda q, k, v: aiter_dist.flash_attn_func(q, k, v, causal=causal),
                 "ours_det": lambda q, k, v: aiter_dist.flash_attn_func(q, k, v, causal=causal,
                                                                        deterministic=True),
                 "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, causal, h != hk),
                 "fa2": sdpa(SDPBackend.FLASH_ATTENTION, causal, h != hk)}
        for name, fn in impls.items():
            try:
                f_ms, b_ms = time_fwd_bwd(fn, q, k, v)
                res[name] = (fl / f_ms / 1e9, 2.5 * fl / b_ms / 1e9)
            except Exception as e:  # a backend that refuses the shape is reported, not fatal
                res[name] = (float("nan"), float("nan"))
                print(f"{name} b{b} s{s} h{h}/{hk} d{d}: {type(e).__name__}: {str(e)[:120]}")
        tag = f"b{b} s{s} h{h}/{hk} d{d} {'causal' if causal else 'full'}"
        rows.append((tag, res["ours"][0], res["cudnn"][0], res["fa2"][0],
                     res["ours"][0] / res["cudnn"][0], res["ours"][1], res["ours_det"][1],
                     res["cudnn"][1], res["fa2"][1], res["ours"][1] / res["cudnn"][1]))
        summary[tag] = res
        print(tag, {k: (round(a), round(b_)) for k, (a, b_) in res.items()}, flush=True)
    # varlen: ragged lengths summing to 16384 tokens, causal, hd128
    lens = [4096, 1000, 3000, 512, 2048, 1771, 4000, 57]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens), 16, 128, device=dev, dtype=dt)
    fl = sum(flops(1, 16, n, n, 128, True) for n in lens)
    res = {}
    for det in (False, True):
        res[det] = time_fwd_bwd(lambda q, k, v: aiter_dist.flash_attn_varlen_func(
            q, k, v, cu, cu, max(lens), max(lens), causal=True, deterministic=det),
            q, q.clone(), q.clone())

    def per_sequence(backend):  # SDPA has no varlen entry: one call per sequence
        def run(q, k, v):
            return torch.cat([sdpa(backend, True, False)(q[None, a:b], k[None, a:b],
                                                         v[None, a:b])[0]
                              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        return run

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("fa2", SDPBackend.FLASH_ATTENTION)):
        res[name] = time_fwd_bwd(per_sequence(backend), q, q.clone(), q.clone())
    tf = {name: (fl / f / 1e9, 2.5 * fl / b / 1e9) for name, (f, b) in res.items()}
    rows.append(("varlen 8 seqs 16384 tok h16 d128 causal (SDPA: a call per sequence)",
                 tf[False][0], tf["cudnn"][0], tf["fa2"][0], tf[False][0] / tf["cudnn"][0],
                 tf[False][1], tf[True][1], tf["cudnn"][1], tf["fa2"][1],
                 tf[False][1] / tf["cudnn"][1]))
    emit("Flash attention bf16 (TFLOP/s)",
         ["shape", "ours fwd", "cuDNN fwd", "FA2 fwd", "fwd ours/cuDNN", "ours bwd",
          "ours bwd deterministic", "cuDNN bwd", "FA2 bwd", "bwd ours/cuDNN"], rows, summary,
         "bench_attention.md")


if __name__ == "__main__":
    main()
