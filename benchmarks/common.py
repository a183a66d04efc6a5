"""Shared benchmark plumbing: device facts, the copy-bandwidth ceiling, table printing."""
from __future__ import annotations

import datetime
import json
import os

import torch
import triton


def env_header() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"device: {name} | date: {datetime.date.today()} | torch {torch.__version__} | "
            f"triton {triton.__version__}")


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the memory-bound ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200,
                                 return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e12


def call_us(fn, n: int, loops: int, warmup: int, sync=None) -> float:
    """Median over ``loops`` of the wall time of ``n`` calls of ``fn``, per call in us, after
    ``warmup`` calls. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each loop's clock
    starts and after it stops, so a loop times the host's issue of its calls alone."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(loops):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    if sync is not None:
        sync()
    return statistics.median(samples)


def capture_graph(fn, calls: int = 1):
    """``calls`` calls of ``fn`` captured into a CUDA graph (warmed up first)."""
    from aiter_dist.testing import capture_graph as capture

    return capture(fn, calls)[0]


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                        for v in r) + " |")
    return "\n".join(lines)


def emit(title: str, headers, rows, summary: dict, out_name: str) -> None:
    """Print the table and the one-line JSON summary; also write them under $OUT if set."""
    text = f"## {title}\n\n{env_header()}\n\n{markdown_table(headers, rows)}\n"
    print(text)
    print(json.dumps(summary))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, out_name), "w") as f:
            f.write(text + "\n" + json.dumps(summary) + "\n")
