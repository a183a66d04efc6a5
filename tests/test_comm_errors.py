"""Ranks that disagree, ranks that never come, ranks that die: every case ends in a clear
``RuntimeError`` on every rank within the comm timeout, naming the op, the ranks and both sides'
messages, and leaves nothing in /dev/shm. CPU ranks (the real kernels through the interpreter
and the /dev/shm workspace) unless marked."""
import glob
import os
import random
import subprocess
import sys
import time

import pytest
import torch

import aiter_dist
from aiter_dist.testing import run_distributed, run_gpu_ranks, shares_gpus

TIMEOUT_ENV = {"AITER_DIST_COMM_TIMEOUT_S": "5"}


def _recover_and_check(world):
    """After an error every rank releases its workspaces; the next collectives work and leave
    clean signal pads."""
    from aiter_dist.comm import get_workspace, release_workspaces

    release_workspaces()
    out = aiter_dist.all_reduce(torch.ones(33), algo="one_shot")
    assert torch.equal(out, torch.full((33,), float(world)))
    big = aiter_dist.all_reduce(torch.ones(100_000))  # torch.distributed: agreed, then gloo
    assert torch.equal(big, torch.full((100_000,), float(world)))
    assert get_workspace().signal_pads_clean()
    torch.distributed.barrier()  # no peer signals into the pads before every rank checked them


def _raises_everywhere(call, pattern):
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=pattern):
        call()
    return time.monotonic() - t


DIFFERENT = r"launched a different message: "


def _mismatched_messages(rank, world):
    other = rank == 1
    cases = [
        # same grid, different sizes: program 0 sees the peer's header
        (lambda: aiter_dist.all_reduce(torch.ones(999 if other else 1000), algo="one_shot"),
         DIFFERENT + r"all_reduce of (999|1000) elements of float32 .* against this rank's "
                     r"all_reduce of (1000|999) elements"),
        # different grids (2 programs vs 1): the mismatch, not a misleading timeout
        (lambda: aiter_dist.all_reduce(torch.ones(10000 if other else 20000), algo="one_shot"),
         DIFFERENT + r"all_reduce of \d+ elements"),
        (lambda: aiter_dist.all_reduce(torch.ones(64, dtype=torch.float16 if other
                                                  else torch.float32), algo="one_shot"),
         r"elements of float(32|16) .* against this rank's all_reduce of 64 elements of "
         r"float(16|32)"),
        # same message, one-shot on one rank and two-shot on the other
        (lambda: aiter_dist.all_reduce(torch.ones(64), algo="two_shot" if other else "one_shot"),
         r"the algorithm or row width differs"),
        # same elements, different shapes: all_gather of (4, 8) against (8, 4)
        (lambda: aiter_dist.all_gather(torch.ones((8, 4) if other else (4, 8)), algo="one_shot"),
         r"all_gather of 32 elements .* \(same size, different shapes or dim\)"),
        # different ops with identical launch shapes
        (lambda: (aiter_dist.reduce_scatter(torch.ones(128), algo="one_shot") if other
                  else aiter_dist.all_gather(torch.ones(64), algo="one_shot")),
         DIFFERENT + r"(reduce_scatter|all_gather) of \d+ elements .* against this rank's "
                     r"(all_gather|reduce_scatter)"),
    ]
    waits = []
    for call, pattern in cases:
        waits.append(_raises_everywhere(call, pattern))
        with pytest.raises(RuntimeError, match="unusable after an earlier error"):
            aiter_dist.all_reduce(torch.ones(8), algo="one_shot")
        _recover_and_check(world)
    return max(waits)


def test_ranks_that_disagree_raise_and_recover():
    waits = run_distributed(_mismatched_messages, 2, env=TIMEOUT_ENV)
    assert max(waits) < 5, waits  # reported when seen, not after the 5 s timeout


def _split_across_auto(rank, world, warm):
    """Sizes on either side of the auto table: one rank takes the kernel, the other
    torch.distributed. Both raise at once, each naming the other's message."""
    if warm:
        aiter_dist.all_reduce(torch.ones(10))
    n = 1024 if rank == 0 else 1 << 20  # 4 KB (kernel) against 4 MB (gloo on CPU)
    wait = _raises_everywhere(
        lambda: aiter_dist.all_reduce(torch.ones(n)),
        r"all_reduce of (1048576|1024) elements of float32 \(call #\d+, (torch.distributed|the "
        r"kernel)\), against this rank's all_reduce of (1024|1048576) elements")
    _recover_and_check(world)
    # Both ranks compose (torch.distributed), different sizes: the records differ.
    n = (1 << 19) if rank == 0 else 1 << 20
    wait = max(wait, _raises_everywhere(
        lambda: aiter_dist.all_reduce(torch.ones(n)),
        r"rank \d of group .* called all_reduce of \d+ elements of float32 \(call #\d+, "
        r"torch.distributed\), against this rank's all_reduce of \d+ elements"))
    _recover_and_check(world)
    return wait


@pytest.mark.parametrize("warm", [False, True], ids=["first-call", "after-warm-up"])
def test_ranks_split_across_the_auto_threshold_raise(warm):
    waits = run_distributed(_split_across_auto, 2, warm, env=TIMEOUT_ENV)
    assert max(waits) < 5, waits


def _fuzz(rank, world, seed, cases):
    """Random disagreements (size, dtype, shape, op, algo), the same draw on every rank; one rank
    deviates. Every case must raise on every rank, then the group recovers."""
    rng = random.Random(seed)
    ops = ["all_reduce", "all_gather", "reduce_scatter", "all_reduce_add_rms_norm"]
    for _ in range(cases):
        odd = rng.randrange(world)
        what = rng.choice(["size", "dtype", "shape", "op", "algo"])
        op = rng.choice(ops)
        rows = world * rng.randint(1, 4)
        big = rng.random() < 0.3 and what != "algo"  # past the auto table: torch.distributed
        cols = (40_000 // rows + 8) & ~1 if big else rng.choice([8, 24])
        dtype = torch.float32
        algo = "auto"
        shape = (rows, cols)
        if rank == odd:
            if what == "size":
                shape = (rows + world, cols)
            elif what == "dtype":
                dtype = torch.float16
            elif what == "shape":  # same elements, dim 0 still divisible by the world
                shape = (2 * rows, cols // 2)
            elif what == "op":
                op = ops[(ops.index(op) + 1) % len(ops)]
            else:
                algo = "fallback"
        x = torch.ones(shape, dtype=dtype)
        if op == "all_reduce":
            call = lambda: aiter_dist.all_reduce(x, algo=algo)  # noqa: E731
        elif op == "all_gather":
            call = lambda: aiter_dist.all_gather(x, algo=algo)  # noqa: E731
        elif op == "reduce_scatter":
            call = lambda: aiter_dist.reduce_scatter(x, algo=algo)  # noqa: E731
        else:
            call = lambda: aiter_dist.all_reduce_add_rms_norm(  # noqa: E731
                x, torch.zeros_like(x), torch.ones(x.shape[-1], dtype=dtype), algo=algo)
        if rank == odd and what == "algo" and op == "all_reduce_add_rms_norm":
            pattern = r"aiter_dist\.\w+: "
        else:
            pattern = r"aiter_dist\.\w+: rank \d of (group|the workspace)"
        wait = _raises_everywhere(call, pattern)
        assert wait < 5, (what, op, wait)
        from aiter_dist.comm import release_workspaces
        release_workspaces()
    _recover_and_check(world)
    return True


@pytest.mark.parametrize("world,seed,cases", [(2, 1, 8), (3, 2, 4), (4, 3, 3)])
def test_fuzzed_disagreements_raise_on_every_rank(world, seed, cases):
    before = set(glob.glob("/dev/shm/aiter_dist-*"))
    run_distributed(_fuzz, world, seed, cases, env=TIMEOUT_ENV, timeout=400)
    assert set(glob.glob("/dev/shm/aiter_dist-*")) <= before


def _missing_rank(rank, world):
    aiter_dist.get_workspace()  # created together; then rank 1 skips the collective
    if rank == 1:
        time.sleep(8)
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
    # The watchdog enforces the timeout by the clock on CPU: about 2 s, not a poll count.
    assert 1.5 < waited < 6, waited


def _peer_exits(rank, world, path):
    aiter_dist.get_workspace()
    if rank == 1:
        os._exit(0)  # a clean exit that no launcher reports
    time.sleep(0.5)
    t = time.time()
    n = 100 if path == "kernel" else 100_000
    with pytest.raises(RuntimeError, match=r"rank 1 of .* exited"):
        aiter_dist.all_reduce(torch.ones(n))
    return time.time() - t


@pytest.mark.parametrize("path", ["kernel", "torch.distributed"])
def test_exited_peer_is_noticed_at_once(path):
    waited = run_distributed(_peer_exits, 2, path, env={"AITER_DIST_COMM_TIMEOUT_S": "60"},
                             exits={1}, timeout=120)[0]
    assert waited < 5, waited  # not the 60 s timeout


def _dies_during_setup(rank, world):
    from aiter_dist.comm import workspace

    if rank == 1:
        real = workspace._map_files

        def die(paths, nbytes):
            if len(paths) > 1:  # the data files, after rank 1 created its own
                os._exit(3)
            return real(paths, nbytes)
        workspace._map_files = die
    with pytest.raises(Exception):
        aiter_dist.get_workspace()
    return True


def test_no_shm_file_outlives_a_rank_that_dies_in_setup():
    before = set(glob.glob("/dev/shm/aiter_dist-*"))
    run_distributed(_dies_during_setup, 2, exits={1}, timeout=120,
                    env={"TORCH_GLOO_TIMEOUT_S": "20"})
    assert set(glob.glob("/dev/shm/aiter_dist-*")) <= before


def test_stale_files_of_dead_processes_are_swept():
    from aiter_dist.comm.workspace import sweep_stale_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = f"/dev/shm/aiter_dist-{dead}-deadbeef-r0"
    live = f"/dev/shm/aiter_dist-{os.getpid()}-cafe-r0"
    for p in (stale, live):
        open(p, "wb").close()
    try:
        assert sweep_stale_files() >= 1
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for p in (stale, live):
            if os.path.exists(p):
                os.unlink(p)


# ----------------------------------------------------------------------------- multi-GPU tier

def _gpu_missing_rank(rank, world):
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
    run_gpu_ranks(_gpu_missing_rank, world=2, env={"AITER_DIST_COMM_TIMEOUT_S": "2"}, timeout=180)


def _gpu_split_across_auto(rank, world):
    """Eager calls: one rank's message goes to the kernel, the other's to NCCL. Both raise."""
    dev = aiter_dist.local_device()
    n = 1024 if rank == 0 else 16 << 20
    with pytest.raises(RuntimeError, match=r"all_reduce of \d+ elements"):
        aiter_dist.all_reduce(torch.ones(n, device=dev), algo="one_shot" if rank == 0 else "auto")
        torch.cuda.synchronize()
        aiter_dist.check_errors()
    return True


@pytest.mark.multigpu
def test_kernel_against_nccl_raises_gpu():
    run_gpu_ranks(_gpu_split_across_auto, world=2, env=TIMEOUT_ENV, timeout=180)


def _cpu_tensor_on_nccl_group(rank, world):
    with pytest.raises(ValueError, match=r"all_reduce: x is on cpu but the process group has no "
                                         r"cpu backend"):
        aiter_dist.all_reduce(torch.ones(8), algo="fallback")
    return True


@pytest.mark.multigpu
def test_cpu_tensor_on_an_nccl_only_group_is_refused():
    if shares_gpus(2):
        pytest.skip("needs an NCCL group: one GPU per rank")
    run_gpu_ranks(_cpu_tensor_on_nccl_group, world=2)
