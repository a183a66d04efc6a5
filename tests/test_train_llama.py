"""CPU-tier end-to-end tests of examples/train_llama.py: real torchrun / mpiexec launches of the
tiny Llama, aiter_dist tensor parallel (the default mode) and PyTorch's own (--no-aiter).

Each run is a subprocess with its own free MASTER_PORT and a timeout; results are parsed from the
JSON line the script prints last. Runs shared by several tests are cached for the module.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_llama.py"
TIMEOUT_S = 240
STEPS = 6  # short runs: TP=2 in the default mode costs ~1.5 s a step on a 2-core CPU

# TP=1 vs TP=2, fp32: the two differ only in summation order (the row-parallel layers add two
# partial products, and the grad norm is summed shard by shard), i.e. ~1e-7 relative per op.
# Over a few Adam steps that stays ~1e-7 on the loss (measured: 6e-8 after 6 steps); 1e-5 leaves
# two orders of magnitude of headroom and still catches any real sharding error (>= 1e-3).
TP_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    # A caller's torchrun/MPI variables would make the child think it is already a rank.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        env.pop(k, None)
    return env


def _run(cmd: list[str]) -> dict:
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT_S}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, (f"{' '.join(cmd)} exited {p.returncode}\n"
                                         f"--- stdout\n{p.stdout[-4000:]}\n"
                                         f"--- stderr\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def torchrun(nproc: int, *args) -> dict:
    # torchrun reads its port from --master-port (or PET_MASTER_PORT), not MASTER_PORT; its default
    # monitor interval (5 s on some versions) would add seconds to every run's exit.
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(_free_port()), "--monitor-interval", "0.1", str(SCRIPT),
                 "--config", "tiny", "--log-every", "1000", *map(str, args)])


_cache: dict = {}


def cached(nproc: int, *args) -> dict:
    key = (nproc, *args)
    if key not in _cache:
        _cache[key] = torchrun(nproc, *args)
    return _cache[key]


def _check_summary(r: dict, world: int, aiter: bool, steps: int):
    assert r["world_size"] == world and r["aiter"] is aiter and r["steps"] == steps
    assert r["config"] == "tiny" and r["device"] == "cpu"
    # Tensor parallel replicates the loss: every rank must report the same value.
    assert r["loss_rank_spread"] == 0.0, r


def test_tp2_loss_falls():
    # (the backward on the engine's thread, not the default caller's: on CPU, where autograd
    # runs it on the caller's thread either way, this checks the flag's plumbing)
    r = torchrun(2, "--steps", 10, "--backward-thread", "engine")
    _check_summary(r, 2, True, 10)
    assert r["backward_thread"] == "engine"
    assert r["first_loss"] > 5.0  # ~ln(256) = 5.55 at init
    assert r["last_loss"] < r["first_loss"] - 1.0, r  # measured: 5.57 -> 3.43 at step 10
    assert r["tokens_per_s"] > 0


def test_tp2_matches_tp1():
    one, two = cached(1, "--steps", STEPS), cached(2, "--steps", STEPS)
    _check_summary(one, 1, True, STEPS)
    _check_summary(two, 2, True, STEPS)
    assert one["first_loss"] == pytest.approx(two["first_loss"], rel=TP_RTOL)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=TP_RTOL), (one, two)


def test_communication_modes_reach_the_same_loss():
    """Fused add+RMSNorm (default), unfused all-reduces and sequence parallelism compute the same
    model: the same losses, step after step."""
    fused = cached(2, "--steps", STEPS)
    assert fused["comm"] == "all_reduce_add_rms_norm"
    for flag, comm in (("--sequence-parallel", "sequence_parallel"), ("--no-fuse-norm", "off")):
        other = torchrun(2, "--steps", STEPS, flag)
        _check_summary(other, 2, True, STEPS)
        assert other["comm"] == comm
        assert other["first_loss"] == pytest.approx(fused["first_loss"], rel=TP_RTOL), flag
        assert other["last_loss"] == pytest.approx(fused["last_loss"], rel=TP_RTOL), (flag, other)


@pytest.mark.parametrize("mode", ["fused", "--sequence-parallel"])
def test_compiled_training_matches_eager(mode):
    """--compile (aot_eager on CPU: aiter_dist's ops are custom ops torch.compile traces, their
    kernels run as in eager) computes the same losses as the eager run."""
    extra = [] if mode == "fused" else [mode]
    eager = cached(2, "--steps", STEPS, *extra)
    compiled = torchrun(2, "--steps", STEPS, "--compile", *extra)
    assert compiled["compile"] == "aot_eager" and eager["compile"] is None
    assert compiled["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-6), (eager, compiled)


def test_torch_tp2_baseline_matches_aiter():
    """--no-aiter TP=2 (PyTorch's DTensor tensor parallel) reaches the same loss as aiter_dist."""
    base = cached(2, "--steps", STEPS, "--no-aiter")
    _check_summary(base, 2, False, STEPS)
    ours = cached(2, "--steps", STEPS)
    assert base["last_loss"] == pytest.approx(ours["last_loss"], rel=TP_RTOL), (base, ours)


@pytest.mark.parametrize("world", [1, 2])
def test_training_ops_match_pytorch_ops(world):
    """aiter_dist's RoPE, SwiGLU and loss (linear_cross_entropy on one rank, the vocab-parallel
    head and loss on two) train the same model as PyTorch's ops (--no-train-ops) and as plain
    PyTorch (--no-aiter): the same losses step after step."""
    ours = cached(world, "--steps", STEPS)
    assert ours["loss"] == ("linear_cross_entropy" if world == 1
                            else "vocab_parallel_cross_entropy"), ours
    for flag in ("--no-train-ops", "--no-aiter"):
        other = cached(world, "--steps", STEPS, flag)
        assert other["loss"] == ("torch" if flag == "--no-aiter" else "model's own"), other
        assert other["first_loss"] == pytest.approx(ours["first_loss"], rel=TP_RTOL), flag
        assert other["last_loss"] == pytest.approx(ours["last_loss"], rel=TP_RTOL), (flag, other)


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def test_mpiexec_launch():
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the Python interpreter or on PATH "
                    "(pip install mpich, or install an MPI)")
    pytest.importorskip("mpi4py", reason="init_distributed reads rank/size from mpi4py")
    r = _run([mpiexec, "-n", "2", sys.executable, str(SCRIPT), "--config", "tiny", "--steps",
              "3", "--log-every", "1000"])
    _check_summary(r, 2, True, 3)
    assert r["last_loss"] < r["first_loss"]
