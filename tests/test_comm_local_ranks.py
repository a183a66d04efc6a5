"""The collective kernels between "virtual ranks" of one process on one GPU: each rank has its own
buffer, signal area, error record and CUDA stream, and the kernels get the same pointer tables a
real group's workspace gives them. The ranks' launches then run concurrently on one device, so
thousands of collectives with random per-rank device delays take seconds, and every protocol
path (barriers, header checks, poison, reports) is exercised on real hardware without a second
GPU. GPU tier (one GPU); the CPU tier covers the same kernels across processes."""
import importlib
import random
import time

import pytest
import torch

from aiter_dist.comm.protocol import DTYPE_CODE, Call, check_comm_errors, shape_key
from aiter_dist.comm.workspace import (ERR_FIELDS, HEADER_BYTES, max_programs_for,
                                       signal_bytes)

AR = importlib.import_module("aiter_dist.comm.all_reduce")
GS = importlib.import_module("aiter_dist.comm.gather_scatter")
FN = importlib.import_module("aiter_dist.comm.fused_norm")


class _State:
    broken = None
    name = "local"


class LocalRank:
    """What the launchers read of a workspace, for one virtual rank."""

    def __init__(self, rank, world, bufs, buf_ptrs, sig_ptrs, nbytes):
        self.rank, self.world_size = rank, world
        self.device = bufs[rank].device
        self.max_programs = max_programs_for("cuda")
        self.buffer_ptrs, self.signal_ptrs = buf_ptrs, sig_ptrs
        self.err = torch.zeros(ERR_FIELDS, dtype=torch.int64, pin_memory=True)
        self.err_host = self.err.numpy()
        self.broken, self.state = None, _State()
        self.data_bytes = nbytes - HEADER_BYTES
        self.stream = torch.cuda.Stream(self.device)

    def describe(self):
        return f"virtual rank {self.rank} of {self.world_size}"


def local_group(world, nbytes=4 << 20):
    dev = torch.device("cuda", torch.cuda.current_device())
    sig = signal_bytes(max_programs_for("cuda"))
    bufs = [torch.zeros(sig + nbytes, dtype=torch.uint8, device=dev) for _ in range(world)]
    bases = [b.data_ptr() for b in bufs]
    sig_ptrs = torch.tensor(bases, dtype=torch.int64, device=dev)
    buf_ptrs = torch.tensor([b + sig for b in bases], dtype=torch.int64, device=dev)
    ranks = [LocalRank(r, world, bufs, buf_ptrs, sig_ptrs, nbytes) for r in range(world)]
    for r in ranks:
        r.keepalive = bufs
    return ranks


def _ops(world, i, dev):
    """(name, op id, make(rank) -> inputs, prepare(inputs) -> launch(ws, call) -> output,
    expected(rank)). prepare allocates the outputs, so that the ranks' launches follow each other
    with no allocation between them: a device allocation (or memset) issued between commands of
    two streams keeps them from running concurrently (CUDA's implicit synchronization), and a
    rank spinning for a peer queued behind it would never see it arrive."""
    n = 1 + (i * 37) % 300 if i % 5 else 1 + (i * 7919) % 200_000
    m = 1 + i % 7 if i % 3 else 1 + (i * 131) % 9000
    k = 3 if i % 2 else 1 + (i * 17) % 5000
    rows, cols = world * (1 + i % 3), 8 * (1 + i % 64)
    want = float(sum(r + i % 5 for r in range(world)))

    def ar(two):
        def prepare(x):
            out = torch.empty_like(x)

            def launch(ws, call):
                AR._launch_all_reduce(ws, call, x, out, two, True)
                return out
            return launch
        return (f"all_reduce two_shot={two}", AR.OP_ALL_REDUCE,
                lambda r: torch.full((n,), float(r + i % 5), device=dev), prepare,
                lambda r: torch.full((n,), want))

    def ag_prepare(x):
        out = torch.empty(world, m, device=dev)

        def launch(ws, call):
            GS._launch_flat(ws, call, x, out.view(-1), m, False)
            return out
        return launch

    def rs_prepare(x):
        out = torch.empty(k, device=dev)

        def launch(ws, call):
            GS._launch_flat(ws, call, x, out, k, True)
            return out
        return launch

    def fused(mode):
        def prepare(x2):
            m_ = x2.shape[0] // world if mode == FN.MODE_REDUCE_SCATTER else x2.shape[0]
            w = torch.ones(cols, device=dev)
            res = torch.empty(m_, cols, device=dev)
            y = torch.empty(m_ * (world if mode == FN.MODE_ALL_GATHER else 1), cols, device=dev)
            rstd = torch.empty(m_, device=dev)
            r2 = torch.zeros(m_, cols, device=dev) if mode != FN.MODE_ALL_GATHER else None

            def launch(ws, call):
                FN._launch_fused(mode, ws, call, x2, r2, w, y, res if r2 is not None else None,
                                 rstd, None, m_, 1e-6)
                return res if mode != FN.MODE_ALL_GATHER else y
            return launch
        shard = rows // world
        if mode == FN.MODE_ALL_REDUCE:
            return ("all_reduce_add_rms_norm", FN.OP_ALL_REDUCE_ADD_RMS_NORM,
                    lambda r: torch.ones(rows, cols, device=dev), prepare,
                    lambda r: torch.full((rows, cols), float(world)))
        if mode == FN.MODE_REDUCE_SCATTER:
            return ("reduce_scatter_add_rms_norm", FN.OP_REDUCE_SCATTER_ADD_RMS_NORM,
                    lambda r: torch.ones(rows, cols, device=dev), prepare,
                    lambda r: torch.full((shard, cols), float(world)))
        return ("rms_norm_all_gather", FN.OP_RMS_NORM_ALL_GATHER,
                lambda r: torch.ones(shard, cols, device=dev), prepare,
                lambda r: torch.ones(world * shard, cols))

    return [ar(False), ar(True),
            ("all_gather", GS.OP_ALL_GATHER,
             lambda r: torch.full((m,), float(r), device=dev), ag_prepare,
             lambda r: torch.arange(world, dtype=torch.float32)[:, None].expand(world, m)),
            ("reduce_scatter", GS.OP_REDUCE_SCATTER,
             lambda r: torch.ones(world * k, device=dev) * (i + 1), rs_prepare,
             lambda r: torch.full((k,), float(world * (i + 1)))),
            fused(FN.MODE_ALL_REDUCE), fused(FN.MODE_REDUCE_SCATTER), fused(FN.MODE_ALL_GATHER)]


def _run_op(ranks, seq, op, rng, max_sleep):
    name, op_id, make, prepare, expected = op
    inputs = [make(r.rank) for r in ranks]
    launches = [prepare(x) for x in inputs]
    torch.cuda.synchronize()
    outs = [None] * len(ranks)
    order = list(range(len(ranks)))
    rng.shuffle(order)
    for r in order:
        ws = ranks[r]
        call = Call(seq, op_id, DTYPE_CODE[torch.float32], inputs[r].numel(),
                    shape_key(inputs[r].shape))
        with torch.cuda.stream(ws.stream):
            if max_sleep:
                torch.cuda._sleep(rng.randrange(max_sleep))
            outs[r] = launches[r](ws, call)
    torch.cuda.synchronize()
    for ws in ranks:
        check_comm_errors(ws)
    return [(name, outs[r].cpu(), expected(r)) for r in range(len(ranks))]


@pytest.mark.gpu
@pytest.mark.parametrize("world,iters,max_sleep", [(2, 600, 40_000), (3, 300, 200_000),
                                                   (4, 300, 0), (8, 50, 20_000)])
def test_every_op_with_random_device_delays(world, iters, max_sleep, monkeypatch):
    # A wait that outlives 10 s (the delays are < 1 ms) fails the op and names it, instead of
    # spinning out the default 60 s on every op.
    from aiter_dist.comm import protocol

    monkeypatch.setattr(protocol, "_TIMEOUT_S", 10.0)
    ranks = local_group(world)
    rng = random.Random(world)
    dev = ranks[0].device
    seq = 0
    for i in range(iters):
        prev = None
        for op in _ops(world, i, dev):
            seq += 1
            for name, got, want in _run_op(ranks, seq, op, rng, max_sleep):
                ok = torch.allclose(got, want) if "norm" in name else torch.equal(got, want)
                assert ok, f"iteration {i}, {name} after {prev}: {got.flatten()[:6].tolist()}"
            prev = op[0]


@pytest.mark.gpu
def test_late_rank_each_op_both_orders():
    """Each rank in turn starts ~10 ms late on the device, for every op."""
    ranks = local_group(2)
    dev = ranks[0].device
    seq = 0
    for late in range(2):
        for op in _ops(2, 3, dev):
            seq += 1
            name, op_id, make, prepare, expected = op
            inputs = [make(r) for r in range(2)]
            launches = [prepare(x) for x in inputs]
            torch.cuda.synchronize()
            outs = []
            for ws in ranks:
                call = Call(seq, op_id, DTYPE_CODE[torch.float32], inputs[ws.rank].numel(),
                            shape_key(inputs[ws.rank].shape))
                with torch.cuda.stream(ws.stream):
                    if ws.rank == late:
                        torch.cuda._sleep(20_000_000)
                    outs.append(launches[ws.rank](ws, call))
            torch.cuda.synchronize()
            for ws, out in zip(ranks, outs):
                check_comm_errors(ws)
                assert torch.allclose(out.cpu(), expected(ws.rank)), (name, late)


@pytest.mark.gpu
def test_mismatched_grids_fail_fast_on_every_rank():
    """Ranks launch messages of different sizes (different grids): program 0 of each reports
    the mismatch and poisons every rank, so the surplus programs stop at once instead of
    waiting out the 60 s timeout."""
    ranks = local_group(2)
    dev = ranks[0].device
    sizes = [1 << 20, 1 << 10]
    xs = [torch.ones(n, device=dev) for n in sizes]  # (all allocated before any launch: _ops)
    outs = [torch.empty_like(x) for x in xs]
    torch.cuda.synchronize()
    t0 = time.monotonic()
    for ws, x, out in zip(ranks, xs, outs):
        call = Call(1, AR.OP_ALL_REDUCE, DTYPE_CODE[torch.float32], x.numel(), shape_key(x.shape))
        with torch.cuda.stream(ws.stream):
            AR._launch_all_reduce(ws, call, x, out, False, True)
    torch.cuda.synchronize()
    assert time.monotonic() - t0 < 5
    for ws in ranks:
        with pytest.raises(RuntimeError, match="launched a different message|stopped this"):
            check_comm_errors(ws)


@pytest.mark.gpu
def test_missing_rank_times_out_near_the_configured_wait(monkeypatch):
    """One virtual rank launches, its peer never does: the kernel gives up after about the
    timeout (a spin bound calibrated in polls per second) and reports the missing rank."""
    from aiter_dist.comm import protocol

    monkeypatch.setattr(protocol, "_TIMEOUT_S", 1.0)
    ranks = local_group(2)
    ws = ranks[0]
    x = torch.ones(1000, device=ws.device)
    call = Call(1, AR.OP_ALL_REDUCE, DTYPE_CODE[torch.float32], x.numel(), shape_key(x.shape))
    torch.cuda.synchronize()
    t0 = time.monotonic()
    AR._launch_all_reduce(ws, call, x, torch.empty_like(x), False, True)
    torch.cuda.synchronize()
    waited = time.monotonic() - t0
    print(f"1 s timeout took {waited:.2f} s on the device")
    with pytest.raises(RuntimeError, match="rank 1 of virtual rank 0 of 2 did not arrive"):
        check_comm_errors(ws)
    assert 0.25 < waited < 8, waited
