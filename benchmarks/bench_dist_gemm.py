"""Distributed GEMM (bf16): aiter_dist's all_gather_gemm / gemm_reduce_scatter against NCCL +
cuBLAS one after the other and against torch's async-TP ops, forward and backward, side by side.

    torchrun --nproc-per-node 2 benchmarks/bench_dist_gemm.py [--shapes 2048x4096x4096,...]
        [--passes ag_fwd,ag_bwd,rs_fwd,rs_bwd] [--workspace-mb 256] [--iters 20]

Shapes are ``MxNxK``: M the tokens of the whole group (the gathered / reduced rows), N and K the
features of the GEMM each rank runs (all_gather_gemm: out (M, N) = all_gather(x (M/w, K)) @ W.T;
gemm_reduce_scatter: (M/w, N) = reduce_scatter(x (M, K) @ W.T)). FLOPs per rank: 2*M*N*K
forward, twice that backward (dgrad and wgrad).

Columns (microseconds per call, eager, every rank in lockstep, rank 0's median over repeats):
``overlapped`` and ``gated`` are ours with ``algo=`` forced (``auto`` picks between them by
``dist_gemm.OVERLAP_MIN_ROWS``: the last line prints the M where overlapped starts to win, which
is what that constant should be); ``nccl+cublas`` is torch.distributed's collective and
``torch.mm`` one after the other; ``symm_mem`` is ``torch.ops.symm_mem.fused_all_gather_matmul`` /
``fused_matmul_reduce_scatter`` (for backward: the fused op for the dgrad, NCCL + cuBLAS for the
wgrad, which no fused op covers). ``speedup`` = nccl+cublas / overlapped.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.comm import dist_gemm
from common import emit

SHAPES = "2048x4096x4096,4096x4096x4096,8192x4096x4096,8192x8192x8192"
PASSES = "ag_fwd,ag_bwd,rs_fwd,rs_bwd"


def _median_us(fn, iters: int, repeats: int = 5) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def _nccl_all_gather(x, world):
    out = torch.empty(world * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x)
    return out


def _nccl_reduce_scatter(x, world):
    out = torch.empty(x.shape[0] // world, *x.shape[1:], dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x)
    return out


def _candidates(pass_, M, N, K, world, name):
    """{column: fn} for one pass and shape (inputs made here, bf16, on this rank's GPU)."""
    dev, dt = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    m = M // world
    w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    symm = torch.ops.symm_mem
    if pass_ == "ag_fwd":
        x = torch.randn(m, K, device=dev, dtype=dt)
        return {
            "overlapped": lambda: aiter_dist.all_gather_gemm(x, w, algo="overlapped"),
            "gated": lambda: aiter_dist.all_gather_gemm(x, w, algo="gated"),
            "nccl+cublas": lambda: torch.mm(_nccl_all_gather(x, world), w.t()),
            "symm_mem": lambda: symm.fused_all_gather_matmul(x, [w.t()], 0, name,
                                                             return_A=False),
        }
    if pass_ == "ag_bwd":
        x = torch.randn(m, K, device=dev, dtype=dt)
        dy = torch.randn(M, N, device=dev, dtype=dt)
        bwd = dist_gemm.all_gather_gemm_bwd
        return {
            "overlapped": lambda: bwd(dy, x, w, None, "overlapped", True, True, False),
            "gated": lambda: bwd(dy, x, w, None, "gated", True, True, False),
            "nccl+cublas": lambda: (_nccl_reduce_scatter(dy @ w, world),
                                    dy.t() @ _nccl_all_gather(x, world)),
            "symm_mem": lambda: (symm.fused_matmul_reduce_scatter(dy, w, "sum", 0, name),
                                 dy.t() @ _nccl_all_gather(x, world)),
        }
    x = torch.randn(M, K, device=dev, dtype=dt)
    if pass_ == "rs_fwd":
        return {
            "overlapped": lambda: aiter_dist.gemm_reduce_scatter(x, w, algo="overlapped"),
            "gated": lambda: aiter_dist.gemm_reduce_scatter(x, w, algo="gated"),
            "nccl+cublas": lambda: _nccl_reduce_scatter(x @ w.t(), world),
            "symm_mem": lambda: symm.fused_matmul_reduce_scatter(x, w.t(), "sum", 0, name),
        }
    dy = torch.randn(m, N, device=dev, dtype=dt)
    bwd = dist_gemm.gemm_reduce_scatter_bwd

    def symm_rs_bwd():
        dyg, (dx,) = symm.fused_all_gather_matmul(dy, [w], 0, name, return_A=True)
        return dx, dyg.t() @ x

    def nccl_rs_bwd():
        dyg = _nccl_all_gather(dy, world)
        return dyg @ w, dyg.t() @ x
    return {
        "overlapped": lambda: bwd(dy, x, w, None, "overlapped", True, True, False),
        "gated": lambda: bwd(dy, x, w, None, "gated", True, True, False),
        "nccl+cublas": nccl_rs_bwd,
        "symm_mem": symm_rs_bwd,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--passes", default=PASSES)
    p.add_argument("--workspace-mb", type=int, default=0, help="0: the default workspace size")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    aiter_dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    name = dist.group.WORLD.group_name
    import torch.distributed._symmetric_memory as symm_mem
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.8, a no-op after
        symm_mem.enable_symm_mem_for_group(name)
    if args.workspace_mb:
        aiter_dist.create_workspace(nbytes=args.workspace_mb << 20)
    rows, summary = [], {"world": world, "results": []}
    for pass_ in args.passes.split(","):
        for shape in args.shapes.split(","):
            M, N, K = map(int, shape.split("x"))
            flop = 2 * M * N * K * (2 if pass_.endswith("bwd") else 1)
            us = {}
            for col, fn in _candidates(pass_, M, N, K, world, name).items():
                try:
                    us[col] = _median_us(fn, args.iters)
                except Exception as e:  # a baseline this torch lacks: report, keep going
                    if rank == 0:
                        print(f"{pass_} {shape} {col}: {type(e).__name__}: {e}")
                    us[col] = float("nan")
            best = min(us["overlapped"], us["gated"])
            rows.append((pass_, shape, us["overlapped"], us["gated"], us["nccl+cublas"],
                         us["symm_mem"], us["nccl+cublas"] / us["overlapped"],
                         flop / (best * 1e-6) / 1e12))
            summary["results"].append({"pass": pass_, "shape": shape, **us})
    # The gate: the smallest M from which the overlapped path beats the gated one in every pass.
    wins = {}
    for r in summary["results"]:
        M = int(r["shape"].split("x")[0])
        wins.setdefault(M, []).append(r["overlapped"] < r["gated"])
    gate = next((M for M in sorted(wins) if all(all(wins[k]) for k in wins if k >= M)), None)
    summary["suggested_OVERLAP_MIN_ROWS"] = gate
    if rank == 0:
        emit(f"Distributed GEMM, {world} ranks, bf16 (us per call, eager)",
             ["pass", "MxNxK", "overlapped", "gated", "nccl+cublas", "symm_mem",
              "speedup vs nccl+cublas", "TFLOP/s (ours, best)"], rows, summary,
             "dist_gemm.md")
    dist.barrier()
    aiter_dist.shutdown()


if __name__ == "__main__":
    main()
