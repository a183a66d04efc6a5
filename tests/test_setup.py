"""Import-time interpreter selection and init_distributed under each launcher."""
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-GPU default")


def _py(code, env_update=None, drop=("TRITON_INTERPRET",), timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


@no_gpu
def test_import_turns_on_the_interpreter_without_a_gpu():
    out = _py("import os, aiter_dist; print(os.environ['TRITON_INTERPRET'], aiter_dist.INTERPRETED)")
    assert out == "1 True"


def test_users_own_triton_interpret_wins():
    out = _py("import os, aiter_dist; print(os.environ['TRITON_INTERPRET'], aiter_dist.INTERPRETED)",
              {"TRITON_INTERPRET": "0"})
    assert out == "0 False"


def test_init_distributed_single_process():
    out = _py("""
        import aiter_dist, torch.distributed as dist
        g = aiter_dist.init_distributed()
        assert aiter_dist.init_distributed() is g
        print(dist.get_world_size(g), dist.get_rank(g), dist.get_backend(g))
    """, drop=("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    assert out.startswith("1 0 ")


SCRIPT = """
import torch, torch.distributed as dist, aiter_dist
g = aiter_dist.init_distributed()
r, w = dist.get_rank(g), dist.get_world_size(g)
out = aiter_dist.all_reduce(torch.full((5,), float(r + 1)), algo="one_shot")
assert torch.equal(out, torch.full((5,), w * (w + 1) / 2)), out
print(f"rank {r} of {w} ok {aiter_dist.last_path('all_reduce')}", flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_script(cmd, tmp_path, timeout=240):
    script = tmp_path / "init_check.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MASTER_PORT"] = str(_free_port())
    res = subprocess.run(cmd + [str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-rank check; the GPU path is multigpu")
def test_init_distributed_under_torchrun(tmp_path):
    out = _run_script([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-port", str(_free_port())], tmp_path)
    assert "rank 0 of 2 ok one_shot" in out and "rank 1 of 2 ok one_shot" in out


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


@pytest.mark.skipif(_mpiexec() is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-rank check")
def test_init_distributed_under_mpiexec(tmp_path):
    out = _run_script([_mpiexec(), "-n", "2", sys.executable], tmp_path)
    assert "rank 0 of 2 ok one_shot" in out and "rank 1 of 2 ok one_shot" in out
