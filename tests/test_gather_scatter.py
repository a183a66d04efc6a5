"""All-gather and reduce-scatter over the workspace (CPU ranks through /dev/shm)."""
import pytest
import torch

import aiter_dist
from aiter_dist.comm.gather_scatter import all_gather_ref, reduce_scatter_ref
from aiter_dist.testing import run_distributed, run_gpu_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _shards(world, shape, dtype, seed):
    return [torch.randint(-6, 7, shape, generator=torch.Generator().manual_seed(seed + r))
            .to(dtype) for r in range(world)]


def _device():
    return aiter_dist.local_device()


def _exact(rank, world):
    from aiter_dist.comm import get_workspace

    dev = _device()
    for dtype in DTYPES:
        for shape, dim in (((7,), 0), ((3, 5, 2), 1), ((4, 9), -1), ((1, 1), 0)):
            xs = _shards(world, shape, dtype, 10)
            out = aiter_dist.all_gather(xs[rank].to(dev), dim=dim, algo="one_shot").cpu()
            assert aiter_dist.last_path("all_gather") == "one_shot"
            assert torch.equal(out, all_gather_ref(xs, dim)), (dtype, shape, dim)
            big = list(shape)
            big[dim] *= world
            ys = _shards(world, tuple(big), dtype, 20)
            got = aiter_dist.reduce_scatter(ys[rank].to(dev), dim=dim, algo="one_shot").cpu()
            assert aiter_dist.last_path("reduce_scatter") == "one_shot"
            assert torch.equal(got, reduce_scatter_ref(ys, rank, dim).to(dtype)), (dtype, shape, dim)
            fb = aiter_dist.reduce_scatter(ys[rank].to(dev), dim=dim, algo="fallback").cpu()
            assert torch.equal(got, fb)
    assert get_workspace(device=dev).signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_gather_reduce_scatter_exact_cpu(world):
    run_distributed(_exact, world)


def _autograd(rank, world):
    # all_gather's backward reduce-scatters: with the same weight on every rank, each rank's
    # shard gets world * its slice of the weight.
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    w = torch.randn(3 * world, 4, generator=torch.Generator().manual_seed(99))
    (aiter_dist.all_gather(x, dim=0, algo="one_shot") * w).sum().backward()
    torch.testing.assert_close(x.grad, world * w[3 * rank:3 * rank + 3])
    # reduce_scatter's backward all-gathers the per-rank gradients.
    y = torch.randn(2, 5 * world).requires_grad_()
    v = torch.full((2, 5), float(rank + 1))
    (aiter_dist.reduce_scatter(y, dim=1, algo="one_shot") * v).sum().backward()
    expected = torch.cat([torch.full((2, 5), float(r + 1)) for r in range(world)], dim=1)
    torch.testing.assert_close(y.grad, expected)
    return True


def test_autograd_duals_cpu():
    run_distributed(_autograd, 3)


def _large_and_bad(rank, world):
    from aiter_dist.comm import create_workspace

    create_workspace(nbytes=256 + 4096 * 4)  # forces several pieces
    xs = [torch.arange(10_000, dtype=torch.float32) + 1000 * r for r in range(world)]
    assert torch.equal(aiter_dist.all_gather(xs[rank], algo="one_shot"), torch.cat(xs))
    ys = [torch.full((world * 5000,), float(r + 1)) for r in range(world)]
    got = aiter_dist.reduce_scatter(ys[rank], algo="one_shot")
    assert torch.equal(got, torch.full((5000,), world * (world + 1) / 2))
    with pytest.raises(ValueError, match=r"reduce_scatter: x.shape\[0\]=7 is not divisible"):
        aiter_dist.reduce_scatter(torch.ones(7))
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        aiter_dist.all_gather(torch.ones(3, 3), dim=2)
    with pytest.raises(RuntimeError, match="all_gather: rank \\d of group .* launched a different"):
        aiter_dist.all_gather(torch.ones(64 if rank == 0 else 63), algo="one_shot")
    return True


def test_pieces_and_bad_input_cpu():
    run_distributed(_large_and_bad, 2, env={"AITER_DIST_COMM_TIMEOUT_S": "2"})


@pytest.mark.multigpu
def test_all_gather_reduce_scatter_exact_gpu():
    run_gpu_ranks(_exact)
