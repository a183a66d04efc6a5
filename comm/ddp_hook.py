"""A DistributedDataParallel communication hook that averages gradient buckets with
``aiter_dist.all_reduce``.

    model = DistributedDataParallel(model, ...)
    model.register_comm_hook(None, aiter_dist.ddp_comm_hook)   # or a process group as state

DDP calls the hook once per bucket, in bucket order on every rank, as soon as the bucket's
gradients are ready during the backward, so the reductions overlap the rest of the backward as
DDP's own do. Each bucket takes the collectives' own routing (``policy.AUTO``): small buckets
the one-shot / two-shot kernels where the table sends them, the rest torch.distributed (NCCL,
RCCL, gloo); ``aiter_dist.last_path("ddp_comm_hook")`` tells which served the last bucket.

The returned future is already complete: the kernels (and NCCL) are ordered on the current
stream, which DDP's reducer waits on before it reads the result, so no host wait is needed. On
CPU ranks the reduction is synchronous, so it does not overlap there.
"""
# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
import torch
import torch.distributed as dist

from ..kernels._runtime import FLOAT_DTYPES, last_path, record_path
from .all_reduce import all_reduce_raw

OP = "ddp_comm_hook"


def ddp_comm_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one DDP gradient bucket over the group.

    Args:
        state: the process group registered with the hook (``register_comm_hook(state, hook)``),
            or None for the world. DDP passes it back unchanged on every call. A DDP built over
            a subgroup (``process_group=dp_group``) must register that group here: the hook
            cannot see DDP's group, and None would average over every rank.
        bucket: a ``torch.distributed.GradBucket``; ``bucket.buffer()`` is the flat (numel,)
            gradient buffer (float32, float16 or bfloat16 for the kernels; other dtypes, e.g.
            float64, go to torch.distributed).

    Returns a completed ``torch.futures.Future`` holding a new (numel,) tensor, the mean of the
    ranks' buffers (sum, then divided by the world size: one rounding less than pre-dividing in
    half precision); DDP copies it into the parameters' ``.grad``.
    """
    group = state if state is not None else dist.group.WORLD
    buf = bucket.buffer()
    world = dist.get_world_size(group)
    if buf.dtype in FLOAT_DTYPES:
        out = all_reduce_raw(buf, group)
        record_path(OP, last_path("all_reduce"))
    else:
        out = buf.clone()
        dist.all_reduce(out, group=group)
        record_path(OP, "torch.distributed",
                    f"{buf.dtype} gradients: aiter_dist's all-reduce takes fp32/fp16/bf16")
    out.div_(world)
    # A CUDA future records an event on the current stream; whoever waits on it (DDP's reducer)
    # orders its own stream after the reduction.
    fut = torch.futures.Future(devices=[out.device] if out.device.type == "cuda" else None)
    fut.set_result(out)
    return fut
