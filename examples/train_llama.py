"""Train the example Llama (examples/llama.py) tensor-parallel with aiter_dist, data-parallel
across nodes with PyTorch's FSDP2 or DDP.

    torchrun --nproc-per-node 2 examples/train_llama.py                 # aiter_dist TP=2
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 \
        examples/train_llama.py --config 8b                             # TP=8 per node, DP=2
    torchrun --nproc-per-node 2 examples/train_llama.py --no-aiter      # PyTorch's own TP=2
    torchrun --nproc-per-node 2 examples/train_llama.py --sequence-parallel
    mpiexec -n 2 python examples/train_llama.py --config tiny --steps 3 # MPI launch
    python examples/train_llama.py                                      # one plain process

Layout: the world is split into dp = world / tp replicas of ``--tp`` ranks (default: the ranks of
one node), rank = dp_rank * tp + tp_rank. Inside a replica ``aiter_dist.parallelize`` shards the
model over the tensor-parallel group (peer-to-peer kernels stay within the node); across replicas
the model is wrapped in FSDP2 (``--dp-mode fsdp``, the default: parameters, gradients and optimizer
state sharded over dp) or DDP (``--dp-mode ddp``), which average the gradients over dp only.

Every rank builds the full model from the same seed, then keeps its shard. Every rank draws the
same global batch (``--batch-size`` rows) and keeps its replica's share (rows dp_rank * B/dp on):
tensor-parallel ranks share a batch, replicas differ, and a run with dp=2, tp=2 sees the same
tokens per step as one process. The reported loss is the mean over replicas, identical on all
ranks. Data is byte-level: any text file (``--data``), or by default the Python standard
library's own sources, which exist on every machine.

Checkpoints (``--checkpoint-dir``) go through ``aiter_dist.checkpoint`` (PyTorch's distributed
checkpoint, DCP): every tensor is stored with its place in the full model, with the optimizer state
by parameter name, the step and the data sampler's state, so ``--resume`` continues the loss
trajectory at the same world size or at any other the heads divide by (saved at TP=2, resumed at
TP=1 or TP=4), under any (dp, tp) layout (saved by dp=2 x tp=2 under FSDP2, resumed on one
process or under DDP). Each is a directory ``step00000040/``, renamed from a temporary one only
after every rank has written its part; ``--resume`` takes the newest, ``--keep-last`` prunes the
oldest.
The last line printed (rank 0) is a JSON summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

import aiter_dist
from llama import CONFIGS, Llama, flops_per_token

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16, per GPU
# tiny: 1e-2 drops the loss fastest in the first ~20 steps (the CPU smoke runs are that short);
# 3e-3 ends ~equal at 40 steps and a little lower by 200. Larger models want smaller rates.
DEFAULT_LR = {"tiny": 1e-2, "small": 1e-3, "1b": 3e-4, "8b": 1.5e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="model size (default: tiny without CUDA, small with)")
    p.add_argument("--steps", type=int, default=40, help="total optimizer steps (a resumed run "
                   "continues up to this step)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="GLOBAL batch (sequences per step over all data-parallel replicas; each "
                        "takes batch-size / dp of them); must divide by dp")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks per replica (default: the ranks of one node); "
                        "the world divides into world / tp data-parallel replicas")
    p.add_argument("--dp-mode", choices=("fsdp", "ddp"), default="fsdp",
                   help="data parallelism across replicas (when world > tp): FSDP2 fully_shard "
                        "(bf16 params / fp32 reduce with --dtype bf16) or DistributedDataParallel")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's max_seq_len")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per "
                   f"config: {DEFAULT_LR})")
    p.add_argument("--warmup", type=int, default=5, help="linear warmup steps, then constant lr "
                   "(no dependence on --steps, so a resumed run sees the same schedule)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip; 0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="a text file (bytes are the tokens); default: "
                   "the Python standard library's .py sources")
    p.add_argument("--data-limit-mb", type=float, default=8.0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--save-every", type=int, default=100,
                   help="save every N steps, and after the last one")
    p.add_argument("--keep-last", type=int, default=2,
                   help="complete checkpoints kept, the newest by step (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--no-aiter", action="store_true", help="plain PyTorch (torch TP when world>1)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="shard the residual stream by tokens (reduce-scatter/all-gather fused "
                        "with RMSNorm); batch * seq-len must divide by the world size")
    p.add_argument("--no-train-ops", action="store_true",
                   help="keep PyTorch's RoPE, SwiGLU and loss (aiter_dist's apply_rotary_emb_qk, "
                        "swiglu and linear / vocab-parallel cross-entropy otherwise)")
    p.add_argument("--no-fuse-norm", action="store_true",
                   help="all-reduce each row-parallel output on its own (no fused add+RMSNorm)")
    p.add_argument("--gemm", choices=("auto", "triton", "vendor"), default="auto",
                   help="which GEMM the parallel layers use: the tuned per-shape table (auto), "
                        "aiter_dist's Triton kernel, or cuBLAS/hipBLASLt")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (aiter_dist's ops are custom ops it traces)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on GPUs, aot_eager on CPU, "
                        "which needs no C++ toolchain)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="compile with mode='reduce-overhead': forward and backward replay from "
                        "CUDA graphs (static shapes; the collectives are capturable)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="bf16: autocast with fp32 master weights (default on CUDA); fp32 on CPU")
    p.add_argument("--backward-thread", choices=("engine", "caller"), default="caller",
                   help="where autograd runs a CUDA backward: this process's own thread "
                        "(default: torch.autograd.set_multithreading_enabled(False); each "
                        "process drives one GPU, so the engine's per-device threads add only "
                        "a hand-off per node, which a Python backward pays dearly), or the "
                        "engine's thread for the device (PyTorch's default)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--peak-flops", type=float, default=PEAK_BF16_FLOPS,
                   help="per-GPU peak used for MFU")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.config = args.config or ("small" if cuda else "tiny")
    args.seq_len = args.seq_len or CONFIGS[args.config].max_seq_len
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.config]
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if args.cuda_graphs and not cuda:
        p.error("--cuda-graphs needs a GPU")
    args.compile = args.compile or args.cuda_graphs
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    if args.no_aiter and (args.sequence_parallel or args.no_fuse_norm or args.no_train_ops):
        p.error("--sequence-parallel, --no-fuse-norm and --no-train-ops choose among aiter_dist's "
                "ops; they do not apply with --no-aiter")
    if args.seq_len > CONFIGS[args.config].max_seq_len:
        p.error(f"--seq-len {args.seq_len} exceeds the config's max_seq_len "
                f"{CONFIGS[args.config].max_seq_len}")
    return args


# ----------------------------------------------------------------------------------------- data

def load_bytes(path: str | None, limit: int) -> torch.Tensor:
    """The token stream as uint8. Default: stdlib .py files, walked in sorted order."""
    if path:
        with open(path, "rb") as f:
            data = f.read(limit)
    else:
        chunks, n = [], 0
        root = os.path.dirname(os.__file__)
        for dirpath, dirnames, filenames in os.walk(root):
            # Installed third-party packages differ between machines; the stdlib does not.
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in ("site-packages", "dist-packages", "__pycache__"))
            for name in sorted(filenames):
                if n >= limit:
                    break
                if name.endswith(".py"):
                    try:
                        with open(os.path.join(dirpath, name), "rb") as f:
                            chunk = f.read()
                    except OSError:
                        continue
                    chunks.append(chunk)
                    n += len(chunk)
            if n >= limit:
                break
        data = b"".join(chunks)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def get_batch(data, gen, batch, seq, device, part=0, parts=1):
    """Rows ``part * batch / parts`` on of one global batch of random windows. ``gen`` is seeded
    identically on every rank and advances the same everywhere, so all ranks agree on the global
    batch and each data-parallel replica takes its own share."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    n = batch // parts
    starts = starts[part * n:(part + 1) * n]
    chunk = data[starts[:, None] + torch.arange(seq + 1)].long()
    return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)


# ------------------------------------------------------------------------ tensor-parallel helpers

def _local(t):
    """A DTensor's local shard (PyTorch TP); any other tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def torch_tensor_parallel(model, layout, device):
    """The --no-aiter baseline: PyTorch's own TP over the tensor-parallel mesh (the 2-D mesh's
    ``tp`` dimension, or a 1-D mesh of the world), same sharding as aiter_dist."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = layout.mesh["tp"] if layout.mesh is not None else init_device_mesh(device.type,
                                                                               (layout.tp,))
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
    return model


def tp_replicated(model, full_shapes):
    """Names of the parameters every tensor-parallel rank holds whole. Call after tensor
    parallelism and before data parallelism: a parameter whose local shape differs from its full
    shape then is a tensor-parallel shard (aiter_dist's or a DTensor)."""
    return {n for n, p in model.named_parameters() if tuple(_local(p).shape) == full_shapes[n]}


def norm_copies(names, replicated, layout, dp_sharded):
    """{parameter name: how many ranks hold each element of its gradient} in the (dp, tp)
    layout: ``layout.tp`` for a tp-replicated parameter, 1 for a tp shard, times ``layout.dp``
    under DDP (every replica holds every parameter), times 1 under FSDP (shards over dp)."""
    copies_dp = 1 if dp_sharded else layout.dp
    return {n: copies_dp * (layout.tp if n in replicated else 1) for n in names}


@torch.no_grad()
def clip_grad_norm(named_params, copies, max_norm, world):
    """Global grad norm over the full (unsharded) model, then clip. Every rank adds its local
    gradients' squares, each divided by the number of ranks holding that element (``copies``,
    from :func:`norm_copies`), and one all-reduce over the world sums them: every element is then
    counted once, whether sharded over tp, over dp (FSDP), both, or neither. Works for aiter_dist
    shards and DTensors (PyTorch TP, FSDP2) alike."""
    by_copies, grads = {}, []
    for name, p in named_params:
        if p.grad is None:
            continue
        g = _local(p.grad)
        grads.append(g)
        by_copies.setdefault(copies[name], []).append(g.float().pow(2).sum())
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for c, v in sorted(by_copies.items()):
        sq += torch.stack(v).sum() / c
    if world > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm


# ----------------------------------------------------------------------------------- checkpoints

def _ckpt_identity(args, cfg):
    """What a checkpoint must match to be resumed: the model config, by name and by value."""
    return {"config": args.config, "model_config": dataclasses.asdict(cfg)}


def save_checkpoint(d, step, model, opt, gen, args, cfg, group):
    """``<d>/step<step:08d>/``: model, AdamW state, step, seed and data-sampler state. Every rank
    writes its shards; rank 0 publishes the directory once all are done, then keeps the newest
    ``--keep-last``."""
    extra = {**_ckpt_identity(args, cfg), "seed": args.seed, "data_rng": gen.get_state()}
    return aiter_dist.checkpoint.save(d, step, model, opt, extra=extra, group=group,
                                      keep_last=args.keep_last)


def load_checkpoint(d, model, opt, gen, args, cfg, group):
    """Load the newest complete checkpoint in ``d`` (saved at any tensor-parallel size the model
    divides by) into ``model``, ``opt`` and ``gen``; returns (path, extra), or (None, None)."""
    path = aiter_dist.checkpoint.latest(d, group)
    if path is None:
        return None, None
    try:
        extra = aiter_dist.checkpoint.load(path, model, opt, group=group,
                                           expect=_ckpt_identity(args, cfg))
    except ValueError as e:  # another config, or a model that does not fit: say which, stop
        raise SystemExit(str(e)) from None
    gen.set_state(extra["data_rng"])
    return path, extra


# ------------------------------------------------------------------------------------------ main

def data_parallel(model, layout, args, device):
    """Wrap the tensor-parallel ``model`` for data parallelism over ``layout.dp_group``; returns
    the module to call (FSDP2 shards ``model`` in place and returns it; DDP wraps it)."""
    if args.dp_mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers (RoPE tables) are the same constants everywhere: no broadcast per forward.
        return DDP(model, process_group=layout.dp_group, broadcast_buffers=False,
                   device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if args.dtype == "bf16" else MixedPrecisionPolicy())
    mesh = layout.mesh["dp"]
    # One unit per attention and per MLP (the modules every forward mode calls: the fused
    # forward calls them directly, not their blocks), then the root: embedding, norms, head.
    for block in model.layers:
        for sub in (block.attn, block.mlp):
            fully_shard(sub, mesh=mesh, mp_policy=mp)
    # The root keeps its parameters (embedding, norm weights, head) in fp32, as they are at
    # dp=1 and under DDP: the residual stream then stays fp32 and the runs compare.
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    return model


def peak_mem_gb(device) -> float:
    """This rank's peak memory: CUDA's allocated peak, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def main(argv=None):
    args = parse_args(argv)
    aiter_dist.init_distributed()
    group = dist.group.WORLD  # checkpoints and the loss check span every rank
    rank, world = dist.get_rank(), dist.get_world_size()
    device = aiter_dist.local_device()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(1)  # ranks share the cores; more threads only oversubscribe
    cfg = CONFIGS[args.config]
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        layout = aiter_dist.distributed.init_parallel_mesh(args.tp)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    tp_group, dp = layout.tp_group, layout.dp
    if args.batch_size % dp:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) does not divide over "
                         f"{dp} data-parallel replicas (world {world} / tp {layout.tp})")
    if args.sequence_parallel and (args.batch_size // dp * args.seq_len) % layout.tp:
        raise SystemExit(f"--sequence-parallel: a replica's tokens ({args.batch_size // dp} x "
                         f"{args.seq_len}) must divide by tp={layout.tp}")
    if args.cuda_graphs and dp > 1:
        raise SystemExit("--cuda-graphs with data parallelism (dp > 1) is untested: FSDP2's and "
                         "DDP's gradient collectives run outside the captured graphs; use "
                         "--compile, or --tp equal to the world size")
    if args.no_aiter and dp > 1 and layout.tp > 1 and args.dp_mode == "ddp":
        raise SystemExit("--no-aiter with tp > 1 and dp > 1 needs --dp-mode fsdp (PyTorch's "
                         "tensor parallel makes DTensor parameters, which DDP does not take)")

    # Same seed on every rank -> the same full model everywhere; parallelize keeps the shards.
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Llama(cfg)
    n_params = model.num_params()
    n_matmul = model.num_params(exclude_embedding=True)
    full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    aiter_dist.tgemm.default_backend = args.gemm
    if not args.no_aiter:
        model = aiter_dist.parallelize(model, group=tp_group, fuse_norm=not args.no_fuse_norm,
                                       sequence_parallel=args.sequence_parallel,
                                       train_ops=not args.no_train_ops)
    elif layout.tp > 1:
        model = torch_tensor_parallel(model, layout, device)
    replicated = tp_replicated(model, full_shapes)
    copies = norm_copies(full_shapes, replicated, layout, dp > 1 and args.dp_mode == "fsdp")
    # ``model`` stays the bare module (checkpoints use its names); ``wrapped`` is what runs.
    wrapped = data_parallel(model, layout, args, device) if dp > 1 else model

    # The compiled module wraps the model (its parameters keep their names for checkpoints).
    forward = (torch.compile(wrapped, backend=args.compile_backend,
                             mode="reduce-overhead" if args.cuda_graphs else None)
               if args.compile else wrapped)

    # PyTorch's TP leaves sharded parameters as DTensors and replicated ones as plain tensors,
    # FSDP2 makes DTensors over the dp mesh (2-D over PyTorch's TP): AdamW's multi-tensor
    # (foreach) step needs one kind per parameter group, so group by mesh.
    kinds = {}
    for p in model.parameters():
        kinds.setdefault(id(getattr(p, "device_mesh", None)), []).append(p)
    opt = torch.optim.AdamW([{"params": ps} for ps in kinds.values()], lr=args.lr,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    data = load_bytes(args.data, int(args.data_limit_mb * (1 << 20)))
    gen = torch.Generator().manual_seed(args.seed)

    start = 0
    if args.resume:
        path, extra = load_checkpoint(args.checkpoint_dir, model, opt, gen, args, cfg, group)
        if path is None:
            say(f"no checkpoint in {args.checkpoint_dir}; starting from step 0")
        else:
            start = extra["step"]
            say(f"resumed from step {start} ({path}, saved at world size "
                f"{extra['world_size']})")

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    tokens_per_step = args.batch_size * args.seq_len
    flops_tok = flops_per_token(cfg, args.seq_len, n_matmul)
    say(f"config={args.config} params={n_params / 1e6:.2f}M world={world} tp={layout.tp} "
        f"dp={dp}{f' ({args.dp_mode})' if dp > 1 else ''} device={device} "
        f"dtype={args.dtype} aiter={not args.no_aiter} steps={start}->{args.steps} "
        f"batch={args.batch_size}x{args.seq_len} (global) lr={args.lr} data={data.numel()} "
        f"bytes")

    model.train()
    named = list(model.named_parameters())
    first_loss = last_loss = None
    step_times = []  # every step but the first (allocator warm-up, compilation)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = get_batch(data, gen, args.batch_size, args.seq_len, device, layout.dp_rank, dp)
        with autocast:
            # The model computes its own loss: aiter_dist's head + loss never materializes the
            # whole logits (one rank) or gathers them (tensor parallel: vocab-parallel loss).
            loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        with torch.autograd.set_multithreading_enabled(args.backward_thread == "engine"):
            loss.backward()
        gnorm = clip_grad_norm(named, copies, args.grad_clip, world)
        for g in opt.param_groups:  # warmup, then constant: a function of the step alone
            g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        opt.step()
        if dp > 1:  # each replica's mean over its rows; the global batch's is their mean
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=layout.dp_group)
            loss /= dp
        last_loss = loss.item()  # also the sync point for timing
        dt = time.perf_counter() - t0
        if first_loss is None:
            first_loss = last_loss
        elif step > start:  # the first step (allocator warm-up, autotuning) is not timed
            step_times.append(dt)
        if not math.isfinite(last_loss):
            raise SystemExit(f"rank {rank}: loss is {last_loss} at step {step + 1}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or step == start:
            tps = tokens_per_step / dt
            msg = (f"step {step + 1:5d}/{args.steps} | loss {last_loss:.4f} | "
                   f"gnorm {gnorm.item():.3f} | {tps:,.0f} tok/s | {dt * 1e3:.0f} ms")
            if device.type == "cuda":
                msg += f" | mfu {flops_tok * tps / (args.peak_flops * world):.1%}"
            mem = torch.tensor([peak_mem_gb(device)], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(mem, op=dist.ReduceOp.MAX)
            msg += f" | peak mem {mem.item():.2f} GB/rank (max over ranks)"
            say(msg, flush=True)
        if args.checkpoint_dir and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_checkpoint(args.checkpoint_dir, step + 1, model, opt, gen, args, cfg, group)

    # Tensor parallel replicates the loss (and the dp mean makes it global): check that every
    # rank really computed the same one, and that every tp-replicated parameter (norm weights,
    # embedding) stayed the same on the ranks of each replica.
    spread = replica_spread = 0.0
    if world > 1 and last_loss is not None:
        t = torch.tensor([last_loss, -last_loss], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        spread = float(t[0] + t[1])
    if layout.tp > 1:
        with torch.no_grad():
            rep = [_local(p).double() for n, p in model.named_parameters() if n in replicated]
            sums = torch.stack([torch.stack([r.sum(), r.abs().sum()]) for r in rep]).flatten()
            sums = torch.cat([sums, -sums])
            dist.all_reduce(sums, op=dist.ReduceOp.MAX, group=tp_group)
            replica_spread = float((sums[:len(sums) // 2] + sums[len(sums) // 2:]).abs().max())
    mems = [None] * world
    dist.all_gather_object(mems, round(peak_mem_gb(device), 4))
    # The median step: a compiled model may still recompile in its first steps after the first.
    tps = tokens_per_step / statistics.median(step_times) if step_times else None
    summary = {"first_loss": first_loss, "last_loss": last_loss, "tokens_per_s": tps,
               "world_size": world, "tp_size": layout.tp, "dp_size": dp,
               "dp_mode": args.dp_mode if dp > 1 else None,
               "steps": args.steps, "start_step": start,
               "config": args.config, "aiter": not args.no_aiter, "device": device.type,
               "comm": (getattr(model, "aiter_parallel", {}).get("fused_norm")
                        if not args.no_aiter else "torch"),
               "loss": (getattr(model, "aiter_parallel", {}).get("loss")
                        if not args.no_aiter else "torch"),
               "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                               if device.type == "cuda" else None),
               "dtype": args.dtype, "gemm": args.gemm, "params": n_params,
               "compile": (("cuda-graphs" if args.cuda_graphs else args.compile_backend)
                           if args.compile else None),
               "batch_size": args.batch_size, "backward_thread": args.backward_thread,
               "seq_len": args.seq_len, "loss_rank_spread": spread,
               "tp_replica_spread": replica_spread, "peak_mem_gb_per_rank": mems,
               "mfu": (flops_tok * tps / (args.peak_flops * world)
                       if device.type == "cuda" and tps else None)}
    say(json.dumps(summary), flush=True)
    dist.barrier()  # every rank is done with its collectives


if __name__ == "__main__":
    main()
    # After main() returns, nothing refers to the model any more: shutdown() collects it with
    # the process group it holds, which joins gloo's worker threads before the interpreter ends.
    aiter_dist.shutdown()
