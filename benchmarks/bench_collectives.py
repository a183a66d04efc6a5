"""Collectives (bf16): aiter_dist's kernels against NCCL and torch.ops.symm_mem, side by side.

    torchrun --nproc-per-node 2 benchmarks/bench_collectives.py [--ops all_reduce,all_gather,
        reduce_scatter,fused,sequence_parallel] [--sizes 4K,64K,...] [--tokens 1,16,...]

Every op is timed under CUDA-graph replay (a graph of ``iters`` calls, replayed: what a model's
captured step pays) and eager (a Python call per iteration) beside it. Every rank runs the same
fixed number of iterations, so collectives stay in lockstep; times are medians over repeats, rank
0's reported, in microseconds per call. Sizes are the message each rank contributes (all-reduce,
reduce-scatter input) or receives (all-gather output). Bus bandwidth = 2*(w-1)/w * bytes / time.

Baselines: NCCL through torch.distributed; ``torch.ops.symm_mem.one_shot_all_reduce`` and
``two_shot_all_reduce_``; for the fused ops, NCCL's collective followed by a ``torch.compile``d
add+RMSNorm. The last part prints the ``algo="auto"`` table these numbers imply.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

import aiter_dist
from common import capture_graph, emit

SIZES = "4K,16K,64K,256K,512K,1M,4M,16M,64M,256M"
TOKENS = "1,16,128,1024,4096,16384"
HIDDEN = "4096,8192"


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def _median_us(run, calls: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def time_eager(fn, iters: int) -> float:
    for _ in range(3):
        fn()

    def run():
        for _ in range(iters):
            fn()
    return _median_us(run, iters)


def time_graph(fn, iters: int) -> float:
    graph = capture_graph(fn, iters)
    graph.replay()
    t = _median_us(graph.replay, iters)
    del graph
    return t


def _iters(nbytes: int) -> int:
    return 50 if nbytes <= (4 << 20) else (10 if nbytes <= (64 << 20) else 4)


def _ratio(base, ours):
    return base / ours if ours == ours and ours > 0 else float("nan")


# ----------------------------------------------------------------------------- ops

def bench_all_reduce(sizes, dev, world, gname, summary):
    import torch.distributed._symmetric_memory as symm_mem

    rows, auto = [], []
    for size in sizes:
        nbytes = parse_size(size)
        n = nbytes // 2
        x = torch.randn(n, device=dev, dtype=torch.bfloat16)
        it = _iters(nbytes)
        res = {}
        for algo in ("one_shot", "two_shot"):
            res[f"{algo} graph"] = time_graph(lambda: aiter_dist.all_reduce(x, algo=algo), it)
        if nbytes <= (32 << 20):
            # Input already in the workspace (a producer wrote it there): no copy in, as for
            # torch's symm_mem ops, whose input lives in symmetric memory.
            xw = aiter_dist.workspace_tensor(x.shape, x.dtype, device=dev)
            xw.copy_(x)
            res["one_shot in-ws graph"] = time_graph(
                lambda: aiter_dist.all_reduce(xw, algo="one_shot"), it)
        res["auto graph"] = time_graph(lambda: aiter_dist.all_reduce(x), it)
        res["auto eager"] = time_eager(lambda: aiter_dist.all_reduce(x), it)
        res["one_shot eager"] = time_eager(lambda: aiter_dist.all_reduce(x, algo="one_shot"), it)
        y = x.clone()
        res["nccl graph"] = time_graph(lambda: dist.all_reduce(y), it)
        res["nccl eager"] = time_eager(lambda: dist.all_reduce(y), it)
        if nbytes <= (64 << 20):
            t = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(t, gname)
            t.copy_(x)
            res["symm one_shot graph"] = time_graph(
                lambda: torch.ops.symm_mem.one_shot_all_reduce(t, "sum", gname), it)
            res["symm two_shot graph"] = time_graph(
                lambda: torch.ops.symm_mem.two_shot_all_reduce_(t, "sum", gname), it)
            del t
        ours = min(res["one_shot graph"], res["two_shot graph"])
        best_symm = min((v for k, v in res.items() if k.startswith("symm")), default=float("nan"))
        rows.append((size, res["one_shot graph"], res["two_shot graph"],
                     res.get("one_shot in-ws graph", float("nan")), res["nccl graph"],
                     _ratio(res["nccl graph"], ours), res.get("symm one_shot graph", float("nan")),
                     res.get("symm two_shot graph", float("nan")), _ratio(best_symm, ours),
                     res["auto eager"], res["nccl eager"],
                     2 * (world - 1) / world * nbytes / (ours * 1e-6) / 1e9))
        best = min(("one_shot", "two_shot", "nccl"), key=lambda k: res[f"{k} graph"])
        auto.append((nbytes, best))
        summary.setdefault("all_reduce", {})[size] = res
        print("all_reduce", size, {k: round(v, 1) for k, v in res.items()}, flush=True)
    return ("All-reduce bf16, world %d (us per call)" % world,
            ["size", "one-shot graph", "two-shot graph", "one-shot, input in workspace",
             "NCCL graph", "NCCL/ours (best)",
             "symm one-shot", "symm two-shot", "best symm/ours", "auto eager", "NCCL eager",
             "ours busbw GB/s"], rows, auto)


def bench_gather_scatter(sizes, dev, world, summary):
    rows = []
    for size in sizes:
        nbytes = parse_size(size)
        it = _iters(nbytes)
        n_out = nbytes // 2 // world * world
        shard = torch.randn(n_out // world, device=dev, dtype=torch.bfloat16)
        full = torch.randn(n_out, device=dev, dtype=torch.bfloat16)
        out_ag = torch.empty(n_out, device=dev, dtype=torch.bfloat16)
        out_rs = torch.empty(n_out // world, device=dev, dtype=torch.bfloat16)
        res = {
            "ag graph": time_graph(lambda: aiter_dist.all_gather(shard, algo="one_shot"), it),
            "ag eager": time_eager(lambda: aiter_dist.all_gather(shard, algo="one_shot"), it),
            "nccl ag graph": time_graph(lambda: dist.all_gather_into_tensor(out_ag, shard), it),
            "nccl ag eager": time_eager(lambda: dist.all_gather_into_tensor(out_ag, shard), it),
            "rs graph": time_graph(lambda: aiter_dist.reduce_scatter(full, algo="one_shot"), it),
            "rs eager": time_eager(lambda: aiter_dist.reduce_scatter(full, algo="one_shot"), it),
            "nccl rs graph": time_graph(lambda: dist.reduce_scatter_tensor(out_rs, full), it),
            "nccl rs eager": time_eager(lambda: dist.reduce_scatter_tensor(out_rs, full), it),
        }
        rows.append((size, res["ag graph"], res["nccl ag graph"],
                     _ratio(res["nccl ag graph"], res["ag graph"]), res["rs graph"],
                     res["nccl rs graph"], _ratio(res["nccl rs graph"], res["rs graph"]),
                     res["ag eager"], res["nccl ag eager"], res["rs eager"], res["nccl rs eager"]))
        summary.setdefault("gather_scatter", {})[size] = res
        print("gather_scatter", size, {k: round(v, 1) for k, v in res.items()}, flush=True)
    return ("All-gather (output size) and reduce-scatter (input size), bf16, world %d (us)" % world,
            ["size", "AG graph", "NCCL AG graph", "NCCL/ours", "RS graph", "NCCL RS graph",
             "NCCL/ours", "AG eager", "NCCL AG eager", "RS eager", "NCCL RS eager"], rows, None)


def _compiled_norms():
    def add_norm(x, r, w, eps: float = 1e-6):
        s = (x.float() + r.float()).to(x.dtype)
        sf = s.float()
        y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        return y.to(x.dtype), s

    def norm(x, w, eps: float = 1e-6):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

    return torch.compile(add_norm), torch.compile(norm)


def _graph_and_eager(fns, iters, eager=()):
    """``{"<name> graph": us}`` for every callable, ``"<name> eager"`` for those in ``eager``."""
    res = {f"{name} graph": time_graph(fn, iters) for name, fn in fns.items()}
    res.update({f"{name} eager": time_eager(fns[name], iters) for name in eager})
    return res


def bench_fused(tokens, hiddens, dev, world, summary, sequence_parallel: bool):
    add_norm, norm = _compiled_norms()
    rows = []
    for h in hiddens:
        for m in tokens:
            if sequence_parallel and m % world:
                continue
            w = torch.randn(h, device=dev, dtype=torch.bfloat16)
            x = torch.randn(m, h, device=dev, dtype=torch.bfloat16)
            nbytes = x.numel() * 2
            it = _iters(nbytes)
            if not sequence_parallel:
                r = torch.randn(m, h, device=dev, dtype=torch.bfloat16)
                ours = lambda: aiter_dist.all_reduce_add_rms_norm(x, r, w, algo="one_shot")  # noqa
                fp8 = lambda: aiter_dist.all_reduce_add_rms_norm_fp8(x, r, w, algo="one_shot")  # noqa
                auto = lambda: aiter_dist.all_reduce_add_rms_norm(x, r, w)  # noqa
                y = x.clone()

                def base():
                    dist.all_reduce(y)
                    return add_norm(y, r, w)
                res = _graph_and_eager({"fused": ours, "fp8": fp8, "auto": auto, "base": base},
                                       it, eager=("fused", "base"))
                rows.append((f"{m}x{h}", res["fused graph"], res["auto graph"], res["base graph"],
                             _ratio(res["base graph"], min(res["fused graph"], res["auto graph"])),
                             res["fp8 graph"], res["fused eager"], res["base eager"]))
            else:
                r = torch.randn(m // world, h, device=dev, dtype=torch.bfloat16)
                out = torch.empty(m // world, h, device=dev, dtype=torch.bfloat16)
                gathered = torch.empty(m, h, device=dev, dtype=torch.bfloat16)
                rs = lambda: aiter_dist.reduce_scatter_add_rms_norm(x, r, w, algo="one_shot")  # noqa
                ag = lambda: aiter_dist.rms_norm_all_gather(r, w, algo="one_shot")  # noqa

                def base_rs():
                    dist.reduce_scatter_tensor(out, x)
                    return add_norm(out, r, w)

                def base_ag():
                    dist.all_gather_into_tensor(gathered, norm(r, w))
                    return gathered
                res = _graph_and_eager({"rs": rs, "base rs": base_rs, "ag": ag,
                                        "base ag": base_ag}, it, eager=("rs", "base rs"))
                rows.append((f"{m}x{h}", res["rs graph"], res["base rs graph"],
                             _ratio(res["base rs graph"], res["rs graph"]), res["ag graph"],
                             res["base ag graph"], _ratio(res["base ag graph"], res["ag graph"]),
                             res["rs eager"], res["base rs eager"]))
            key = "sequence_parallel" if sequence_parallel else "fused"
            summary.setdefault(key, {})[f"{m}x{h}"] = res
            print(key, m, h, {k: round(v, 1) for k, v in res.items()}, flush=True)
    if sequence_parallel:
        return ("reduce_scatter_add_rms_norm / rms_norm_all_gather, bf16, world %d (us); base: "
                "NCCL + torch.compile'd norm" % world,
                ["tokens x hidden", "RS+norm graph", "base graph", "base/ours", "norm+AG graph",
                 "base graph", "base/ours", "RS+norm eager", "base eager"], rows, None)
    return ("all_reduce_add_rms_norm, bf16, world %d (us); base: NCCL all-reduce + "
            "torch.compile'd add+RMSNorm" % world,
            ["tokens x hidden", "fused graph", "auto graph", "base graph", "base/ours (best)",
             "fp8-out graph", "fused eager", "base eager"], rows, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="all_reduce,all_gather,fused,sequence_parallel",
                    help="all_reduce, all_gather (with reduce_scatter), fused, sequence_parallel")
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--tokens", default=TOKENS)
    ap.add_argument("--hidden", default=HIDDEN)
    args = ap.parse_args()
    group = aiter_dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = aiter_dist.local_device()
    ops = args.ops.split(",")
    sizes = args.sizes.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    hiddens = [int(h) for h in args.hidden.split(",")]
    summary = {"world": world}
    tables = []
    if "all_reduce" in ops:
        tables.append(bench_all_reduce(sizes, dev, world, group.group_name, summary))
    if "all_gather" in ops or "reduce_scatter" in ops:
        tables.append(bench_gather_scatter(sizes, dev, world, summary))
    if "fused" in ops:
        tables.append(bench_fused(tokens, hiddens, dev, world, summary, False))
    if "sequence_parallel" in ops:
        tables.append(bench_fused(tokens, hiddens, dev, world, summary, True))
    if rank == 0:
        for i, (title, headers, rows, auto) in enumerate(tables):
            emit(title, headers, rows, summary if i == len(tables) - 1 else {"table": title},
                 f"bench_collectives_w{world}_{i}.md")
            if auto:
                # The fastest algorithm per size (graph replay): the "cuda" row of the auto table.
                print("auto table (graph replay), bytes -> fastest:",
                      json.dumps([[b, a] for b, a in auto]))
    dist.barrier()
    aiter_dist.comm.release_workspaces()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
