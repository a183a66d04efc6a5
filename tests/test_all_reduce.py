"""All-reduce over the symmetric workspace: CPU ranks through /dev/shm (CPU tier) and GPUs
through torch symmetric memory (multigpu tier) run the same Triton kernels (one-shot, two-shot)."""
import glob

import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.comm.all_reduce import all_reduce_ref
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
            expected = all_reduce_ref(xs)
            out = aiter_dist.all_reduce(xs[rank].to(dev), algo=algo)
            assert aiter_dist.last_path("all_reduce") == algo
            assert out.dtype == dtype and out.shape == (n,)
            assert torch.equal(out.cpu(), expected), f"{dtype} n={n}: wrong sum"
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(g, out) for g in gathered), f"{dtype} n={n}: ranks disagree"
            report.append((str(dtype), n))
    assert get_workspace(device=dev).signal_pads_clean()
    return report


def _random_bitwise(rank, world):
    """Random inputs: every rank holds bitwise the same result, equal to the rank-order sum, and
    the two kernels give the same bits."""
    out_shape = (3, 5, 67)
    results = []
    for dtype in DTYPES:
        x = torch.randn(out_shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
        out = aiter_dist.all_reduce(x.to(_device()), algo="one_shot").cpu()
        two = aiter_dist.all_reduce(x.to(_device()), algo="two_shot").cpu()
        assert torch.equal(out, two), f"{dtype}: one-shot and two-shot differ"
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


@pytest.mark.parametrize("world,algo", [(2, "one_shot"), (3, "one_shot"), (2, "two_shot"),
                                        (3, "two_shot"), (4, "two_shot")])
def test_exact_cpu(world, algo):
    run_distributed(_exact_and_bitwise, world, SIZES, algo)


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
    mid = torch.ones(30_000)  # 120 KB: the CPU table's two-shot range
    assert torch.equal(aiter_dist.all_reduce(mid), torch.full_like(mid, world))
    assert aiter_dist.last_path("all_reduce") == "two_shot"
    # Autograd: backward is identity (Megatron's row-parallel output reduce).
    xg = x.clone().requires_grad_()
    aiter_dist.all_reduce(xg, algo="one_shot").mul(torch.arange(10.0)).sum().backward()
    assert torch.equal(xg.grad, torch.arange(10.0))
    with pytest.raises(ValueError, match="algo must be one of 'auto', 'one_shot', 'two_shot'"):
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
    x = torch.arange(10_000, dtype=torch.float32) * (rank + 1)
    for algo in ("one_shot", "two_shot"):
        out = aiter_dist.all_reduce(x, algo=algo)
        assert torch.equal(out, torch.arange(10_000.0) * (world * (world + 1) / 2)), algo
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_message_larger_than_workspace_goes_in_pieces(world):
    run_distributed(_larger_than_workspace, world)


def _workspace_input(rank, world):
    """A producer writes straight into the workspace: the collectives skip the copy in and give
    the same results as from an ordinary tensor."""
    from aiter_dist.comm import get_workspace

    dev = _device()
    ws = get_workspace(device=dev)
    for dtype in DTYPES:
        for algo in ("one_shot", "two_shot"):
            n = 1001
            x = aiter_dist.workspace_tensor((7, 143), dtype, device=dev)
            assert ws.holds(x) and x.data_ptr() == ws.data_ptr
            src = (torch.arange(n) % 13 + rank).to(dtype).view(7, 143)
            x.copy_(src.to(dev))  # the "producer"
            out = aiter_dist.all_reduce(x, algo=algo)
            expected = sum((torch.arange(n) % 13 + r) for r in range(world)).to(dtype).view(7, 143)
            assert torch.equal(out.cpu(), expected), (dtype, algo)
        g = aiter_dist.workspace_tensor((5,), dtype, device=dev)
        g.copy_(torch.arange(5, dtype=dtype) + 10 * rank)
        got = aiter_dist.all_gather(g, algo="one_shot").cpu()
        assert torch.equal(got, torch.cat([torch.arange(5, dtype=dtype) + 10 * r
                                           for r in range(world)]))
        s = aiter_dist.workspace_tensor((world * 3, 2), dtype, device=dev)
        s.copy_(torch.ones(world * 3, 2, dtype=dtype) * (rank + 1))
        got = aiter_dist.reduce_scatter(s, algo="one_shot").cpu()
        assert torch.equal(got, torch.full((3, 2), world * (world + 1) / 2, dtype=dtype))
    # An ordinary view into the workspace that does not start at its data region is copied in.
    assert not ws.holds(aiter_dist.workspace_tensor((10,), torch.float32, device=dev)[1:])
    with pytest.raises(ValueError, match=r"workspace_tensor: .* needs \d+ B but the workspace"):
        aiter_dist.workspace_tensor((ws.data_bytes,), torch.float32, device=dev)
    assert ws.signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_input_in_workspace_skips_copy_cpu(world):
    run_distributed(_workspace_input, world)


def _stress(rank, world, iters):
    """Every collective in a loop with random per-rank delays between calls: right every time,
    ranks agree, and no flag is left set."""
    import random
    import time

    from aiter_dist.comm import get_workspace

    dev = _device()
    rng = random.Random(1234 + rank)  # per-rank delays
    for i in range(iters):
        time.sleep(rng.random() * 0.02)
        n = 1 + (i * 37) % 300
        x = torch.full((n,), float(rank + i % 5), device=dev)
        want = sum(float(r + i % 5) for r in range(world))
        algo = ("one_shot", "two_shot")[i % 2]
        assert torch.equal(aiter_dist.all_reduce(x, algo=algo).cpu(), torch.full((n,), want))
        g = aiter_dist.all_gather(x[: 1 + i % 7], algo="one_shot").cpu()
        assert torch.equal(g, torch.cat([torch.full((1 + i % 7,), float(r + i % 5))
                                         for r in range(world)]))
        rs = aiter_dist.reduce_scatter(torch.ones(world * 3, device=dev) * (i + 1), algo="one_shot")
        assert torch.equal(rs.cpu(), torch.full((3,), float(world * (i + 1))))
        if i % 4 == 0:
            rows = torch.ones(world * 2, 8, device=dev)
            out, res = aiter_dist.reduce_scatter_add_rms_norm(rows, torch.zeros(2, 8, device=dev),
                                                              torch.ones(8, device=dev),
                                                              algo="one_shot")
            assert torch.equal(res.cpu(), torch.full((2, 8), float(world)))
    ws = get_workspace(device=dev)
    assert ws.signal_pads_clean() and int(ws.err_host[0]) == 0
    return True


def test_stress_with_random_delays_cpu():
    run_distributed(_stress, 3, 24)


def test_eight_ranks_cpu():
    """The largest group the kernels serve (MAX_WORLD): every collective, a few rounds."""
    run_distributed(_stress, 8, 4, timeout=400)

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
        # same message, one-shot on one rank and two-shot on the other
        (torch.ones(64), r"the same algo \(the sizes agree"),
    ]
    for i, (x, pattern) in enumerate(cases):
        algo = "two_shot" if i == 3 and rank == 1 else "one_shot"
        with pytest.raises(RuntimeError, match=pattern):
            aiter_dist.all_reduce(x, algo=algo)
        with pytest.raises(RuntimeError, match="unusable after an earlier error"):
            aiter_dist.all_reduce(torch.ones(8), algo="one_shot")
        _recover_and_check(world)
    # Two different ops with identical launch shapes: all-gather of 64 on rank 0, reduce-scatter
    # of 128 (64 per rank) on rank 1.
    with pytest.raises(RuntimeError, match=r"(all_gather|reduce_scatter): rank \d .* launched a "
                                           r"different message"):
        if rank == 0:
            aiter_dist.all_gather(torch.ones(64), algo="one_shot")
        else:
            aiter_dist.reduce_scatter(torch.ones(128), algo="one_shot")
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
@pytest.mark.parametrize("algo", ["one_shot", "two_shot"])
def test_exact_gpu(algo):
    world = torch.cuda.device_count()
    run_distributed(_exact_and_bitwise, world, SIZES + [1 << 20, 3 << 22], algo, backend="nccl")


@pytest.mark.multigpu
def test_input_in_workspace_skips_copy_gpu():
    run_distributed(_workspace_input, torch.cuda.device_count(), backend="nccl")


@pytest.mark.multigpu
def test_stress_with_random_delays_gpu():
    run_distributed(_stress, torch.cuda.device_count(), 200, backend="nccl")


def _wrong_device(rank, world):
    other = torch.device("cuda", (torch.cuda.current_device() + 1) % torch.cuda.device_count())
    with pytest.raises(ValueError, match=r"all_reduce: x is on cuda:\d but this rank's device"):
        aiter_dist.all_reduce(torch.ones(8, device=other))
    with pytest.raises(ValueError, match=r"all_gather: x is on cuda:\d but this rank's device"):
        aiter_dist.all_gather(torch.ones(8, device=other))
    return True


@pytest.mark.multigpu
def test_tensor_on_another_gpu_is_refused():
    run_distributed(_wrong_device, 2, backend="nccl")


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
    from aiter_dist.comm import custom_all_reduce_raw

    x = torch.randn(5000, device=_device(), dtype=torch.bfloat16)
    return all(torch.equal(custom_all_reduce_raw(x, algo=algo), x)
               for algo in ("one_shot", "two_shot"))


@pytest.mark.gpu
def test_one_shot_kernel_compiles_and_runs_on_one_gpu():
    assert run_distributed(_single_rank_kernel, 1, backend="nccl") == [True]
