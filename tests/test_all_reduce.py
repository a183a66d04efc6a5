"""All-reduce over the symmetric workspace: CPU ranks through /dev/shm (CPU tier) and GPUs
through torch symmetric memory (multigpu tier) run the same Triton kernels (one-shot, two-shot)."""
import glob

import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.comm.all_reduce import all_reduce_ref
from aiter_dist.testing import gpu_world, run_distributed, run_gpu_ranks, shares_gpus

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 4099, 70001]


def _device():
    return aiter_dist.local_device()


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


def _stress_ops(world, dev, i, x, rows):
    """(name, call, expected) of every collective for iteration ``i`` of the stress loops."""
    f = float(i % 5)
    n = x.numel()
    m = min(1 + i % 7, n)
    w = torch.ones(rows.shape[-1], device=dev)
    want = sum(float(r + i % 5) for r in range(world))
    return [
        ("all_reduce one_shot", lambda: aiter_dist.all_reduce(x, algo="one_shot"),
         torch.full((n,), want)),
        ("all_reduce two_shot", lambda: aiter_dist.all_reduce(x, algo="two_shot"),
         torch.full((n,), want)),
        ("all_gather", lambda: aiter_dist.all_gather(x[:m], algo="one_shot"),
         torch.cat([torch.full((m,), float(r) + f) for r in range(world)])),
        ("reduce_scatter", lambda: aiter_dist.reduce_scatter(
            torch.ones(world * 3, device=dev) * (i + 1), algo="one_shot"),
         torch.full((3,), float(world * (i + 1)))),
        ("all_reduce_add_rms_norm", lambda: aiter_dist.all_reduce_add_rms_norm(
            rows, torch.zeros_like(rows), w, algo="one_shot")[1],
         torch.full(tuple(rows.shape), float(world) * (i % 3 + 1))),
        ("reduce_scatter_add_rms_norm", lambda: aiter_dist.reduce_scatter_add_rms_norm(
            rows, torch.zeros(rows.shape[0] // world, rows.shape[1], device=dev), w,
            algo="one_shot")[1],
         torch.full((rows.shape[0] // world, rows.shape[1]), float(world) * (i % 3 + 1))),
        ("rms_norm_all_gather", lambda: aiter_dist.rms_norm_all_gather(
            rows, w, algo="one_shot"), torch.ones(world * rows.shape[0], rows.shape[1])),
    ]


def _same(name, got, expected):
    """Sums and copies exactly; a normalized row (1 / sqrt(1 + eps)) to fp32 rounding."""
    if name == "rms_norm_all_gather":
        return got.shape == expected.shape and torch.allclose(got, expected, rtol=2e-6, atol=0)
    return torch.equal(got, expected)


def _stress(rank, world, iters, max_delay_s=0.02):
    """Every collective, both all-reduce algorithms, in a loop with random per-rank delays (on
    the host, and on the device before the launch): right every time, ranks agree, and no flag
    is left set. A failure names the iteration, the op and the one before it."""
    import random
    import time

    from aiter_dist.comm import get_workspace

    dev = _device()
    rng = random.Random(1234 + rank)  # per-rank delays
    prev = None
    for i in range(iters):
        n = 1 + (i * 37) % 300 if i % 5 else 1 + (i * 7919) % 40_000
        x = torch.full((n,), float(rank + i % 5), device=dev)
        rows = torch.full((world * (1 + i % 3), 8 + 8 * (i % 4)), float(i % 3 + 1), device=dev)
        for name, call, expected in _stress_ops(world, dev, i, x, rows):
            if rng.random() < 0.3:
                time.sleep(rng.random() * max_delay_s)
            if dev.type == "cuda" and rng.random() < 0.3:
                torch.cuda._sleep(rng.randrange(200_000))  # the launch waits on the device
            got = call().cpu()
            assert _same(name, got, expected), (
                f"iteration {i}, {name} after {prev}: got {got.flatten()[:8].tolist()}, "
                f"expected {expected.flatten()[:8].tolist()}")
            prev = name
    ws = get_workspace(device=dev)
    assert ws.signal_pads_clean() and int(ws.err_host[0]) == 0
    return True


def _late_rank_each_op(rank, world):
    """Every op with each rank in turn arriving late, on the host and (GPU) on the device."""
    import time

    dev = _device()
    for late in range(world):
        for device_side in ([False, True] if dev.type == "cuda" else [False]):
            x = torch.full((999,), float(rank + late), device=dev)
            rows = torch.full((world * 2, 24), float(late % 3 + 1), device=dev)
            for name, call, expected in _stress_ops(world, dev, late, x, rows):
                if rank == late:
                    if device_side:
                        torch.cuda._sleep(50_000_000)  # ~25 ms of device time
                    else:
                        time.sleep(0.05)
                got = call().cpu()
                assert _same(name, got, expected), (name, late, device_side,
                                                    got.flatten()[:8].tolist())
    return True


def test_stress_with_random_delays_cpu():
    run_distributed(_stress, 3, 6)


def test_late_rank_each_op_cpu():
    run_distributed(_late_rank_each_op, 2)


def test_eight_ranks_cpu():
    """The largest group the kernels serve (MAX_WORLD): every collective, a few rounds."""
    run_distributed(_stress, 8, 1, timeout=400)


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
    run_gpu_ranks(_exact_and_bitwise, SIZES + [1 << 20, 3 << 22], algo)


@pytest.mark.multigpu
def test_input_in_workspace_skips_copy_gpu():
    run_gpu_ranks(_workspace_input)


@pytest.mark.multigpu
def test_stress_with_random_delays_gpu():
    # Ranks sharing one GPU time-slice it (about 18 collectives a second): fewer iterations.
    run_gpu_ranks(_stress, 300 if shares_gpus() else 2000, 0.002, timeout=600)


@pytest.mark.multigpu
def test_late_rank_each_op_gpu():
    run_gpu_ranks(_late_rank_each_op)


def _wrong_device(rank, world):
    other = torch.device("cuda", (torch.cuda.current_device() + 1) % torch.cuda.device_count())
    with pytest.raises(ValueError, match=r"all_reduce: x is on cuda:\d but this rank's device"):
        aiter_dist.all_reduce(torch.ones(8, device=other))
    with pytest.raises(ValueError, match=r"all_gather: x is on cuda:\d but this rank's device"):
        aiter_dist.all_gather(torch.ones(8, device=other))
    return True


@pytest.mark.multigpu
def test_tensor_on_another_gpu_is_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU to put the tensor on")
    run_gpu_ranks(_wrong_device, world=2)


@pytest.mark.multigpu
def test_one_shot_random_bitwise_gpu():
    world = gpu_world()
    per_rank = run_gpu_ranks(_random_bitwise)
    for r in range(1, world):
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0], per_rank[r]))


def _single_rank_kernel(rank, world):
    """One rank still runs the whole kernel (copy in, barriers with itself, header check)."""
    from aiter_dist.comm import custom_all_reduce_raw

    x = torch.randn(5000, device=_device(), dtype=torch.bfloat16)
    return all(torch.equal(custom_all_reduce_raw(x, algo=algo), x)
               for algo in ("one_shot", "two_shot"))


@pytest.mark.gpu
def test_one_shot_kernel_compiles_and_runs_on_one_gpu():
    assert run_distributed(_single_rank_kernel, 1) == [True]
