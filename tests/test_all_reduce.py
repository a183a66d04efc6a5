"""All-reduce over the symmetric workspace: CPU ranks through /dev/shm (CPU tier) and GPUs
through torch symmetric memory (multigpu tier) run the same Triton kernel."""
import glob
import os

import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.testing import run_distributed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 4099, 70001]


def _device():
    return aiter_dist.local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _exact_and_bitwise(rank, world, sizes, algo):
    """Integer-valued inputs: the sum is exact in every dtype, so compare exactly; then check
    every rank holds the same bits and the signal pads are clean."""
    from aiter_dist.comm import get_workspace

    dev = _device()
    report = []
    for dtype in DTYPES:
        for n in sizes:
            xs = [torch.randint(-6, 7, (n,), generator=torch.Generator().manual_seed(1000 * r + n))
                  .to(dtype) for r in range(world)]
            expected = sum(x.to(torch.float64) for x in xs).to(dtype)
            out = aiter_dist.all_reduce(xs[rank].to(dev), algo=algo)
            assert aiter_dist.last_path("all_reduce") == "one_shot"
            assert out.dtype == dtype and out.shape == (n,)
            assert torch.equal(out.cpu(), expected), f"{dtype} n={n}: wrong sum"
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(g, out) for g in gathered), f"{dtype} n={n}: ranks disagree"
            report.append((str(dtype), n))
    assert get_workspace(device=dev).signal_pads_clean()
    return report


def _random_bitwise(rank, world):
    """Random inputs: every rank holds bitwise the same result, equal to the rank-order sum."""
    out_shape = (3, 5, 67)
    results = []
    for dtype in DTYPES:
        x = torch.randn(out_shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
        out = aiter_dist.all_reduce(x.to(_device()), algo="one_shot").cpu()
        xs = [torch.randn(out_shape, generator=torch.Generator().manual_seed(r)).to(dtype)
              for r in range(world)]
        acc = torch.zeros(out_shape)
        for t in xs:
            acc += t.float()
        assert out.shape == out_shape
        # fp32 accumulation in rank order, rounded once: PyTorch's fp32 sum exactly in fp32, and
        # within one rounding of it in 16-bit types (the interpreter truncates bf16 stores).
        ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        torch.testing.assert_close(out.float(), acc, rtol=ulp, atol=ulp)
        results.append(out)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_exact_cpu(world):
    run_distributed(_exact_and_bitwise, world, SIZES, "one_shot")


@pytest.mark.parametrize("world", [2, 4])
def test_one_shot_random_bitwise_cpu(world):
    per_rank = run_distributed(_random_bitwise, world)
    for r in range(1, world):
        for a, b in zip(per_rank[0], per_rank[r]):
            assert torch.equal(a, b), "ranks returned different bits"


def _paths_and_autograd(rank, world):
    x = torch.arange(10, dtype=torch.float32) + rank
    y = aiter_dist.all_reduce(x, algo="auto")
    assert aiter_dist.last_path("all_reduce") == "one_shot"  # small message: the kernel
    big = torch.ones(100_000)  # 400 KB > the CPU auto threshold
    assert torch.equal(aiter_dist.all_reduce(big), torch.full_like(big, world))
    assert aiter_dist.last_path("all_reduce") == "torch.distributed"
    z = aiter_dist.all_reduce(x, algo="fallback")
    assert torch.equal(y, z)
    # Autograd: backward is identity (Megatron's row-parallel output reduce).
    xg = x.clone().requires_grad_()
    aiter_dist.all_reduce(xg, algo="one_shot").mul(torch.arange(10.0)).sum().backward()
    assert torch.equal(xg.grad, torch.arange(10.0))
    with pytest.raises(ValueError, match="algo must be"):
        aiter_dist.all_reduce(x, algo="two_shot_typo")
    with pytest.raises(ValueError, match="must be contiguous"):
        aiter_dist.all_reduce(torch.randn(4, 4).t())
    with pytest.raises(TypeError, match="all_reduce: x has dtype torch.int64"):
        aiter_dist.all_reduce(torch.ones(3, dtype=torch.long))
    return True


def test_paths_autograd_and_bad_input_cpu():
    run_distributed(_paths_and_autograd, 2)


def _larger_than_workspace(rank, world):
    from aiter_dist.comm import create_workspace

    create_workspace(nbytes=256 + 4096 * 4)  # data region holds 4096 fp32: the message goes in 3
    x = torch.full((10_000,), float(rank + 1))
    out = aiter_dist.all_reduce(x, algo="one_shot")
    assert torch.equal(out, torch.full_like(x, world * (world + 1) / 2))
    return True


def test_message_larger_than_workspace_goes_in_pieces():
    run_distributed(_larger_than_workspace, 2)


def _recover_and_check(world):
    """After an error every rank releases its workspace; the next collective works and leaves
    clean signal pads."""
    from aiter_dist.comm import get_workspace, release_workspaces

    release_workspaces()
    out = aiter_dist.all_reduce(torch.ones(33), algo="one_shot")
    assert torch.equal(out, torch.full((33,), float(world)))
    assert get_workspace().signal_pads_clean()


def _mismatched_messages(rank, world):
    cases = [
        # same grid, different sizes: program 0 sees the peer's header
        (torch.ones(1000 if rank == 0 else 999), r"launched a different message \(\d+ elements"),
        # different grids (2 programs vs 1): still the mismatch, not a misleading timeout
        (torch.ones(20000 if rank == 0 else 10000), r"launched a different message"),
        (torch.ones(64, dtype=torch.float32 if rank == 0 else torch.float16),
         r"elements of float(32|16)\) than this rank"),
    ]
    for x, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            aiter_dist.all_reduce(x, algo="one_shot")
        with pytest.raises(RuntimeError, match="unusable after an earlier error"):
            aiter_dist.all_reduce(torch.ones(8), algo="one_shot")
        _recover_and_check(world)
    return True


def test_ranks_that_disagree_raise_and_recover():
    run_distributed(_mismatched_messages, 2, env={"AITER_DIST_COMM_TIMEOUT_S": "2"})


def _missing_rank(rank, world):
    import time

    aiter_dist.get_workspace()  # created together; then rank 1 skips the collective
    if rank == 1:
        time.sleep(6)
        _recover_and_check(world)
        return 0.0
    t = time.time()
    with pytest.raises(RuntimeError, match=r"all_reduce: rank 1 of group .* did not arrive"):
        aiter_dist.all_reduce(torch.ones(100), algo="one_shot")
    waited = time.time() - t
    _recover_and_check(world)
    return waited


def test_missing_rank_is_an_error_not_a_hang():
    waited, _ = run_distributed(_missing_rank, 2, env={"AITER_DIST_COMM_TIMEOUT_S": "2"},
                                timeout=120)
    # The bound is a poll count calibrated for an idle machine: a few times 2 s on 2 busy cores.
    assert 1 < waited < 30


def test_shm_files_are_removed():
    before = set(glob.glob("/dev/shm/aiter_dist-*"))
    run_distributed(_paths_and_autograd, 2)
    assert set(glob.glob("/dev/shm/aiter_dist-*")) <= before


def test_single_process_group_is_identity():
    assert not dist.is_initialized()
    aiter_dist.init_distributed()
    try:
        x = torch.randn(5)
        assert torch.equal(aiter_dist.all_reduce(x), x)
        assert aiter_dist.last_path("all_reduce") == "identity"
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- multi-GPU tier

@pytest.mark.multigpu
def test_one_shot_exact_gpu():
    world = torch.cuda.device_count()
    run_distributed(_exact_and_bitwise, world, SIZES + [1 << 20, 3 << 22], "one_shot",
                    backend="nccl")


@pytest.mark.multigpu
def test_one_shot_random_bitwise_gpu():
    world = torch.cuda.device_count()
    per_rank = run_distributed(_random_bitwise, world, backend="nccl")
    for r in range(1, world):
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0], per_rank[r]))


def _gpu_missing_rank(rank, world):
    import time

    aiter_dist.get_workspace()
    if rank == 1:
        time.sleep(8)
        return "absent"
    aiter_dist.all_reduce(torch.ones(100, device="cuda"), algo="one_shot")
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"all_reduce: rank 1 of group .* did not arrive"):
        aiter_dist.check_errors()
    with pytest.raises(RuntimeError, match="unusable after an earlier error"):
        aiter_dist.all_reduce(torch.ones(100, device="cuda"), algo="one_shot")
    return True


@pytest.mark.multigpu
def test_missing_rank_gpu_reports_after_bounded_wait():
    # A subprocess group of its own: a timed-out kernel leaves flags mid-handshake.
    run_distributed(_gpu_missing_rank, 2, backend="nccl", env={"AITER_DIST_COMM_TIMEOUT_S": "2"},
                    timeout=180)


def _single_rank_kernel(rank, world):
    """One rank still runs the whole kernel (copy in, barriers with itself, header check)."""
    from aiter_dist.comm import one_shot_all_reduce_raw

    x = torch.randn(5000, device=_device(), dtype=torch.bfloat16)
    return torch.equal(one_shot_all_reduce_raw(x), x)


@pytest.mark.gpu
def test_one_shot_kernel_compiles_and_runs_on_one_gpu():
    assert run_distributed(_single_rank_kernel, 1, backend="nccl") == [True]
