"""Custom collectives inside CUDA graphs: capture once, replay 20 times with the inputs changed in
place between replays; every replay's outputs must be right (multigpu tier)."""
import pytest
import torch

import aiter_dist
from aiter_dist.testing import capture_graph, run_gpu_ranks

REPLAYS = 20


def _fill(t, rank, step, salt):
    """Integer-valued data per (rank, replay): sums are exact in bf16 up to |256|."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + salt)
    t.copy_(torch.randint(-4, 5, t.shape, generator=g).to(t.dtype))


def _graph_replay(rank, world):
    dev = aiter_dist.local_device()
    dt = torch.bfloat16
    n, rows, hidden = 70_001, 3 * world, 1024
    x = torch.empty(n, dtype=dt, device=dev)
    g_in = torch.empty(4099, dtype=dt, device=dev)
    rs_in = torch.empty(world * 2051, dtype=dt, device=dev)
    fx = torch.empty(rows, hidden, dtype=dt, device=dev)
    fres = torch.empty(rows, hidden, dtype=dt, device=dev)
    sres = torch.empty(rows // world, hidden, dtype=dt, device=dev)
    w = torch.linspace(0.5, 1.5, hidden, device=dev).to(dt)
    inputs = [(x, 1), (g_in, 2), (rs_in, 3), (fx, 4), (fres, 5), (sres, 6)]

    def step():
        return {
            "one_shot": aiter_dist.all_reduce(x, algo="one_shot"),
            "two_shot": aiter_dist.all_reduce(x, algo="two_shot"),
            "auto": aiter_dist.all_reduce(x),
            "all_gather": aiter_dist.all_gather(g_in, algo="one_shot"),
            "reduce_scatter": aiter_dist.reduce_scatter(rs_in, algo="one_shot"),
            "ar_norm": aiter_dist.all_reduce_add_rms_norm(fx, fres, w, algo="one_shot"),
            "rs_norm": aiter_dist.reduce_scatter_add_rms_norm(fx, sres, w, algo="one_shot"),
            "norm_ag": aiter_dist.rms_norm_all_gather(sres, w, algo="one_shot"),
            "fp8": aiter_dist.all_reduce_add_rms_norm_fp8(fx, fres, w, algo="one_shot"),
        }

    for t, salt in inputs:
        _fill(t, rank, 0, salt)
    graph, static = capture_graph(step)
    assert aiter_dist.last_path("all_reduce") == "one_shot"  # auto, captured: the kernel

    for i in range(1, REPLAYS + 1):
        for t, salt in inputs:
            _fill(t, rank, i, salt)
        graph.replay()
        torch.cuda.synchronize()
        aiter_dist.check_errors()
        # Every rank's inputs, rebuilt here, give the exact expected sums.
        xs, gs, rss = [], [], []
        for r in range(world):
            for t, salt, bucket in ((x, 1, xs), (g_in, 2, gs), (rs_in, 3, rss)):
                ref = torch.empty(t.shape, dtype=dt)
                _fill(ref, r, i, salt)
                bucket.append(ref)
        total = torch.stack([t.float() for t in xs]).sum(0).to(dt)
        for key in ("one_shot", "two_shot", "auto"):
            assert torch.equal(static[key].cpu(), total), (i, key)
        assert torch.equal(static["all_gather"].cpu(), torch.cat(gs)), i
        rs_total = torch.stack([t.float() for t in rss]).sum(0).to(dt)
        assert torch.equal(static["reduce_scatter"].cpu(), rs_total.chunk(world)[rank]), i
        # The fused ops against the same ops run eagerly on this replay's inputs.
        eager = step()
        for key in ("ar_norm", "rs_norm", "fp8"):
            for got, want in zip(static[key], eager[key]):
                assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                                   want.view(torch.uint8) if want.dtype.itemsize == 1 else want), (
                    i, key)
        assert torch.equal(static["norm_ag"], eager["norm_ag"]), i
    from aiter_dist.comm import get_workspace

    torch.cuda.synchronize()
    assert get_workspace().signal_pads_clean()
    return True


@pytest.mark.multigpu
def test_collectives_replay_in_cuda_graphs():
    run_gpu_ranks(_graph_replay)
