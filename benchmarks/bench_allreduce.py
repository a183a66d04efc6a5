"""All-reduce (bf16, sum): aiter_dist one-shot vs NCCL vs torch.ops.symm_mem, side by side.

    torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py [--sizes 4K,64K,...]

Each op is timed eager (a Python call per iteration) and under CUDA-graph replay (a graph of
`iters` calls, replayed; the launch overhead leaves the number). Every rank runs the same fixed
number of iterations, so the collectives stay in lockstep. Times are medians over repeats; rank 0's
numbers are reported. Bus bandwidth = 2*(world-1)/world * bytes / time.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import aiter_dist
from common import capture_graph, emit

SIZES = "4K,16K,64K,256K,512K,1M,4M,16M,64M,256M"


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def _median_us(run, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the event time of ``run()`` (which makes ``calls`` calls),
    per call; ranks line up at a barrier before each repeat."""
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
    return _median_us(graph.replay, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile 300 eager 4 KB calls (host overhead) on rank 0 first")
    args = ap.parse_args()
    group = aiter_dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = aiter_dist.local_device()
    import torch.distributed._symmetric_memory as symm_mem

    gname = group.group_name
    if args.profile:
        import cProfile
        import pstats

        x = torch.randn(2048, device=dev, dtype=torch.bfloat16)
        for _ in range(20):
            aiter_dist.all_reduce(x, algo="one_shot")
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            aiter_dist.all_reduce(x, algo="one_shot")
        prof.disable()
        torch.cuda.synchronize()
        if rank == 0:
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    rows, summary = [], {"world": world, "results": {}}
    for size in args.sizes.split(","):
        nbytes = parse_size(size)
        n = nbytes // 2
        x = torch.randn(n, device=dev, dtype=torch.bfloat16)
        iters = 50 if nbytes <= (4 << 20) else (10 if nbytes <= (64 << 20) else 4)
        res = {}
        res["ours eager"] = time_eager(lambda: aiter_dist.all_reduce(x, algo="one_shot"), iters)
        res["ours graph"] = time_graph(lambda: aiter_dist.all_reduce(x, algo="one_shot"), iters)
        y = x.clone()
        res["nccl eager"] = time_eager(lambda: dist.all_reduce(y), iters)
        res["nccl graph"] = time_graph(lambda: dist.all_reduce(y), iters)
        if nbytes <= (64 << 20):
            t = symm_mem.empty(n, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(t, gname)
            t.copy_(x)
            res["symm one_shot graph"] = time_graph(
                lambda: torch.ops.symm_mem.one_shot_all_reduce(t, "sum", gname), iters)
            res["symm two_shot graph"] = time_graph(
                lambda: torch.ops.symm_mem.two_shot_all_reduce_(t, "sum", gname), iters)
            del t
        best_symm = min((v for k, v in res.items() if k.startswith("symm")), default=float("nan"))
        busbw = 2 * (world - 1) / world * nbytes / (res["ours graph"] * 1e-6) / 1e9
        rows.append((size, res["ours graph"], res["nccl graph"], res["nccl graph"] / res["ours graph"],
                     res.get("symm one_shot graph", float("nan")),
                     res.get("symm two_shot graph", float("nan")),
                     best_symm / res["ours graph"], res["ours eager"], res["nccl eager"], busbw))
        summary["results"][size] = res
        if rank == 0:
            print(size, {k: round(v, 1) for k, v in res.items()}, flush=True)
    if rank == 0:
        emit(f"All-reduce bf16, world {world} (us per call)",
             ["size", "ours graph", "NCCL graph", "NCCL/ours", "symm one-shot", "symm two-shot",
              "best symm/ours", "ours eager", "NCCL eager", "ours busbw GB/s"],
             rows, summary, f"bench_allreduce_w{world}.md")
    dist.barrier()
    aiter_dist.comm.release_workspaces()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
