"""The Python work a launch plan saves, on any machine: each call once through the full path and
once through its plan, with every kernel launch stubbed out (so the interpreter's run time and the
GPU play no part).

    python benchmarks/bench_plans_cpu.py

Runs on CPU tensors (an interpreter build; on a GPU machine set ``CUDA_VISIBLE_DEVICES=``). The
full path is timed by hiding the op's plans; the launch key and launcher a GPU call also pays are
not in either column (``bench_overhead.py`` times whole calls on the GPU).
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

import aiter_dist  # (first: picks the interpreter before anything imports Triton)
from aiter_dist.comm import protocol, release_workspaces
from aiter_dist.kernels import _runtime
from aiter_dist.kernels import flash_attn as FA
from common import call_us, emit


class _NoPlans(dict):
    """A plan cache that never answers and keeps nothing: every call takes the full path."""

    def get(self, key, default=None):
        return None

    def __setitem__(self, key, value):
        pass


def _us(fn):
    return call_us(fn, n=5000, loops=5, warmup=200)


def _full_and_planned(module, attr, fn):
    plans = getattr(module, attr)
    fn()  # (makes the plan)
    planned = _us(fn)
    setattr(module, attr, _NoPlans())
    try:
        full = _us(fn)
    finally:
        setattr(module, attr, plans)
    return full, planned


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ar = importlib.import_module("aiter_dist.comm.all_reduce")
    noop = lambda *args, **kwargs: None  # noqa: E731
    _runtime.launch = protocol.launch = FA.launch = noop
    q = torch.randn(1, 128, 8, 64)
    dout, out = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(1, 8, 128)
    x = torch.ones(4096)
    rows = [("all_reduce_raw 4096 fp32, one_shot, group of one",
             *_full_and_planned(ar, "_plans", lambda: ar.all_reduce_raw(
                 x, algo="one_shot", one_rank_kernel=True))),
            ("flash_attn_bwd b1 s128 h8 d64, causal",
             *_full_and_planned(FA, "_bwd_plans", lambda: FA.flash_attn_bwd(
                 dout, q, q, q, out, lse, 0.125, True, (-1, -1))))]
    release_workspaces()
    dist.destroy_process_group()
    emit("Python work per call, launches stubbed: full path against the plan (us)",
         ["call", "full path", "planned"], rows,
         {r[0]: {"full_us": round(r[1], 2), "planned_us": round(r[2], 2)} for r in rows},
         "bench_plans_cpu.md")


if __name__ == "__main__":
    main()
