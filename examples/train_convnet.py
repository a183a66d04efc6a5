"""Train a small ResNet-style convnet data-parallel with aiter_dist's Conv2d, SyncBatchNorm and
DDP communication hook.

    torchrun --nproc-per-node 2 examples/train_convnet.py                # aiter_dist, 2 ranks
    torchrun --nproc-per-node 2 examples/train_convnet.py --no-aiter     # PyTorch's own layers
    python examples/train_convnet.py --steps 10                          # one plain process

Model: a stem 3x3 convolution, ``len(widths)`` stages of residual basic blocks (two 3x3
convolutions with batch norm; every stage after the first halves the resolution with a stride-2
block whose shortcut is a 1x1 convolution + batch norm), global average pooling and a linear
head. With aiter_dist every convolution is ``aiter_dist.nn.Conv2d`` (Triton forward, data and
weight gradient), every batch norm ``aiter_dist.nn.SyncBatchNorm`` (statistics over all ranks,
one all-reduce each way), and DDP averages the gradient buckets through
``aiter_dist.ddp_comm_hook``. ``--no-aiter``: ``torch.nn.Conv2d``, ``torch.nn.SyncBatchNorm``
and DDP's own all-reduce; on CPU ranks, where torch's SyncBatchNorm refuses to run, plain
``torch.nn.BatchNorm2d`` (each rank's own statistics), said at start-up. The model is
channels_last; on GPUs the step runs under bf16 autocast with fp32 master weights.

Data: no data set is downloaded. Images are generated, seeded: class k of ``--classes`` is a
pattern of stripes at angle pi * k / classes, with a random spatial frequency and phase, a random
positive colour per channel, plus Gaussian noise (``--noise``): learnable, not trivially (the
orientation must be found under noise at any phase). Every step draws one global batch of
``--batch-size`` images from a generator on the device seeded by (seed, step), and each rank
keeps its own contiguous share (data parallel): a run sees the same images whatever the world
size or flags (on one device type).

The last line printed (rank 0) is a JSON summary: first_loss, last_loss (means over the global
batch), images_per_s (global, median step after the first), world_size, steps, aiter, device and
the paths that served the last step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import aiter_dist

# tiny: what 2 CPU cores run in about a minute through the Triton interpreter; small: a GPU
# size (32x32 images, ResNet-18-like widths at half the depth).
CONFIGS = {
    "tiny": dict(image=8, widths=(8, 16, 32), blocks=1, batch_size=16, lr=0.05),
    "small": dict(image=32, widths=(64, 128, 256), blocks=2, batch_size=512, lr=0.2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="model and batch size (default: tiny without CUDA, small with)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 30 tiny, "
                   "200 small)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL images per step (each rank takes batch-size / world)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (momentum 0.9, "
                   "linear warmup over --warmup steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.5, help="std of the Gaussian pixel noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-aiter", action="store_true",
                   help="torch.nn.Conv2d, torch.nn.SyncBatchNorm (BatchNorm2d on CPU) and DDP's "
                        "own all-reduce")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="bf16: autocast with fp32 master weights (default on CUDA); fp32 on CPU")
    p.add_argument("--log-every", type=int, default=5)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.config = args.config or ("small" if cuda else "tiny")
    cfg = CONFIGS[args.config]
    args.steps = args.steps if args.steps is not None else (200 if cuda else 30)
    args.batch_size = args.batch_size or cfg["batch_size"]
    args.lr = args.lr if args.lr is not None else cfg["lr"]
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    return args


# ----------------------------------------------------------------------------------------- data

def make_batch(step: int, args, image: int, device: torch.device):
    """The global batch of ``step``: (batch, 3, image, image) float32 images and their (batch,)
    int64 labels, generated on ``device`` (a host-side generator would cap a GPU's images/s)."""
    g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
    n, f32 = args.batch_size, dict(dtype=torch.float32, device=device)
    labels = torch.randint(0, args.classes, (n,), generator=g, device=device)
    angle = math.pi * labels.float() / args.classes
    freq = 0.15 + 0.15 * torch.rand(n, generator=g, **f32)  # cycles per pixel
    phase = 2 * math.pi * torch.rand(n, generator=g, **f32)
    color = 0.5 + torch.rand(n, 3, generator=g, **f32)
    coords = torch.arange(image, **f32) - (image - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    stripes = torch.cos(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    x = color[:, :, None, None] * stripes[:, None]
    return x + args.noise * torch.randn(x.shape, generator=g, **f32), labels


# ---------------------------------------------------------------------------------------- model

class Layers:
    """The convolution and batch-norm classes a model is built from."""

    def __init__(self, aiter: bool, device: torch.device):
        self.conv = aiter_dist.nn.Conv2d if aiter else nn.Conv2d
        if aiter:
            self.norm = aiter_dist.nn.SyncBatchNorm
        elif device.type == "cuda" or not dist.is_initialized() or dist.get_world_size() == 1:
            self.norm = nn.SyncBatchNorm
        else:
            self.norm = nn.BatchNorm2d  # torch's SyncBatchNorm raises on CPU ranks


class BasicBlock(nn.Module):
    def __init__(self, L: Layers, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = L.conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = L.norm(c_out)
        self.conv2 = L.conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = L.norm(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(L.conv(c_in, c_out, 1, stride=stride, bias=False),
                                          L.norm(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ConvNet(nn.Module):
    def __init__(self, L: Layers, widths, blocks: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(L.conv(3, widths[0], 3, padding=1, bias=False),
                                  L.norm(widths[0]), nn.ReLU())
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(L, c, w, 2 if (i > 0 and b == 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------- train

def main(argv=None):
    args = parse_args(argv)
    aiter_dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = aiter_dist.local_device()
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(1)  # ranks share the cores; more threads only oversubscribe
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) does not divide "
                         f"over {world} ranks")
    cfg = CONFIGS[args.config]
    aiter = not args.no_aiter
    L = Layers(aiter, device)
    if L.norm is nn.BatchNorm2d:
        say("note: torch.nn.SyncBatchNorm needs GPU tensors; --no-aiter on CPU ranks uses "
            "torch.nn.BatchNorm2d (each rank's own statistics)")

    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP broadcasts it too)
    model = ConvNet(L, cfg["widths"], cfg["blocks"], args.classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = model
    if world > 1:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if aiter:
            wrapped.register_comm_hook(None, aiter_dist.ddp_comm_hook)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    share = args.batch_size // world
    say(f"convnet config={args.config} params={n_params / 1e6:.3f}M world={world} "
        f"device={device} dtype={args.dtype} aiter={aiter} steps={args.steps} "
        f"batch={args.batch_size} (global) image={cfg['image']} widths={cfg['widths']} "
        f"lr={args.lr}")

    model.train()
    first_loss = last_loss = last_acc = None
    step_times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = make_batch(step, args, cfg["image"], device)
        x = x[rank * share:(rank + 1) * share].contiguous(memory_format=torch.channels_last)
        y = y[rank * share:(rank + 1) * share]
        with autocast:
            logits = wrapped(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        opt.step()
        # Mean over the global batch (every rank holds an equal share); also the timing sync.
        stats = torch.stack([loss.detach().float(),
                             (logits.argmax(1) == y).float().mean()]).cpu()
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        last_loss, last_acc = stats.tolist()
        dt = time.perf_counter() - t0
        if first_loss is None:
            first_loss = last_loss
        else:
            step_times.append(dt)
        if not math.isfinite(last_loss):
            raise SystemExit(f"rank {rank}: loss is {last_loss} at step {step + 1}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or step == 0:
            say(f"step {step + 1:5d}/{args.steps} | loss {last_loss:.4f} | acc {last_acc:.3f} | "
                f"{args.batch_size / dt:,.0f} img/s | {dt * 1e3:.0f} ms", flush=True)

    # DDP keeps the replicas equal: check the parameters really are the same on every rank.
    spread = 0.0
    if world > 1:
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
            both = torch.cat([sums, -sums])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            spread = float((both[:len(sums)] + both[len(sums):]).abs().max())
    ips = args.batch_size / statistics.median(step_times) if step_times else None
    summary = {"first_loss": first_loss, "last_loss": last_loss, "last_acc": last_acc,
               "images_per_s": ips, "world_size": world, "steps": args.steps, "aiter": aiter,
               "device": device.type, "config": args.config, "dtype": args.dtype,
               "batch_size": args.batch_size, "params": n_params,
               "conv": aiter_dist.last_path("conv2d") if aiter else "torch",
               "batchnorm": (aiter_dist.last_path("sync_batch_norm") if aiter
                             else L.norm.__name__),
               "grad_all_reduce": ((aiter_dist.last_path("ddp_comm_hook") or "none")
                                   if aiter else "torch.distributed"),
               "param_rank_spread": spread}
    say(json.dumps(summary), flush=True)
    if world > 1:
        dist.barrier()  # every rank is done with its collectives


if __name__ == "__main__":
    main()
    # Nothing refers to the model after main() returns: shutdown() collects it with the process
    # group it holds, joining gloo's worker threads before the interpreter ends.
    aiter_dist.shutdown()
