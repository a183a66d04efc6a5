"""Many nodes: tensor parallel inside a node on aiter_dist, data parallel across nodes (FSDP2, DDP).

End to end (CPU): two torchrun "nodes" on loopback (``--nnodes 2 --node-rank 0/1``, 2 processes
each, each node naming its own host through ``AITER_DIST_HOSTNAME``) train the tiny Llama with
``--tp 2``, so dp = 2: the loss falls and follows the one-process run of the same global batch,
the summary reports ``tp_size`` 2 and ``dp_size`` 2, tp-replicated parameters stay equal; the
same under DDP with sequence parallelism; a checkpoint saved under FSDP2 resumes in one process
on the uninterrupted curve.

Unit: a group whose ranks report two hosts makes every custom collective take torch.distributed
(recorded in ``last_path``, logged once with the hosts), and its workspace is refused; with four
ranks on two fake hosts ``init_parallel_mesh`` builds tp groups inside each host whose
collectives take the kernels, while the world group falls back.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from aiter_dist.testing import run_distributed

from test_train_llama import (ROOT, SCRIPT, STEPS, TIMEOUT_S, TP_RTOL, _env, _free_port,
                              cached, torchrun)

# dp=2 x tp=2 against one process, fp32: the replicas' mean loss and FSDP's averaged gradients
# equal the full batch's up to summation order (measured: identical bits over 4 steps); the
# same headroom as TP=2 against TP=1.
DP_RTOL = TP_RTOL


def two_nodes(*args, nproc: int = 2) -> dict:
    """Run train_llama.py as two torchrun nodes of ``nproc`` ranks on 127.0.0.1 (hosts
    ``node0``/``node1`` as aiter_dist sees them); node 0's JSON summary."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = _env()
        env["AITER_DIST_HOSTNAME"] = f"node{node}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
               str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--nproc-per-node", str(nproc), "--monitor-interval", "0.1", str(SCRIPT),
               "--config", "tiny", "--log-every", "1", *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT_S) + (p.returncode,))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"two-node run timed out after {TIMEOUT_S}s: {args}")
    report = "\n".join(f"--- node {i} exited {rc}\n{out[-3000:]}\n{err[-3000:]}"
                       for i, (out, err, rc) in enumerate(outs))
    assert all(rc == 0 for _, _, rc in outs), report
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")]
    assert lines, report
    summary = json.loads(lines[-1])
    summary["log"] = outs[0][0]
    return summary


def _check_2d(r: dict, steps: int, dp_mode: str):
    assert r["world_size"] == 4 and r["tp_size"] == 2 and r["dp_size"] == 2, r
    assert r["dp_mode"] == dp_mode and r["steps"] == steps and r["aiter"] is True
    # The reported loss is the mean over replicas: the same on every rank.
    assert r["loss_rank_spread"] == 0.0, r
    # Norm weights and the embedding are replicated over tp; each replica's ranks keep them
    # equal (gradients reduced over dp only, the same on both tp ranks).
    assert r["tp_replica_spread"] == 0.0, r
    assert len(r["peak_mem_gb_per_rank"]) == 4 and all(m > 0 for m in r["peak_mem_gb_per_rank"])
    assert "peak mem" in r["log"] and "GB/rank" in r["log"]


def test_two_nodes_fsdp_matches_one_process():
    """dp=2 (FSDP2) x tp=2 over two nodes trains on the same global batch as one process."""
    one = cached(1, "--steps", STEPS)
    two = two_nodes("--steps", STEPS, "--tp", 2)
    _check_2d(two, STEPS, "fsdp")
    assert two["comm"] == "all_reduce_add_rms_norm"
    assert two["loss"] == "vocab_parallel_cross_entropy"
    assert two["last_loss"] < two["first_loss"] - 0.5, two  # measured: 5.54 -> 4.05 in 6 steps
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=DP_RTOL)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=DP_RTOL), (one, two)


def test_two_nodes_ddp_sequence_parallel():
    """DDP across nodes with sequence parallelism inside each: the same curve. --tp is left to
    its default, the ranks of one node."""
    one = cached(1, "--steps", STEPS)
    two = two_nodes("--steps", STEPS, "--dp-mode", "ddp", "--sequence-parallel")
    _check_2d(two, STEPS, "ddp")
    assert two["comm"] == "sequence_parallel"
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=DP_RTOL), (one, two)


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    """Saved by dp=2 x tp=2 (FSDP2 shards over tp shards), resumed at TP=1: the same curve."""
    saved = two_nodes("--steps", 3, "--tp", 2, "--checkpoint-dir", tmp_path, "--save-every", 3)
    assert saved["dp_size"] == 2 and (tmp_path / "step00000003").is_dir()
    resumed = torchrun(1, "--steps", STEPS, "--checkpoint-dir", tmp_path, "--resume")
    assert resumed["start_step"] == 3 and resumed["world_size"] == 1
    one = cached(1, "--steps", STEPS)
    assert resumed["last_loss"] == pytest.approx(one["last_loss"], rel=DP_RTOL), (one, resumed)


def test_batch_must_divide_over_replicas():
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = _env()
        env["AITER_DIST_HOSTNAME"] = f"node{node}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "--nproc-per-node", "1", "--monitor-interval", "0.1", str(SCRIPT), "--config",
             "tiny", "--batch-size", "3", "--steps", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "--batch-size 3 (the global batch) does not divide over 2 data-parallel" in errs[0]


# ----------------------------------------------------------------------------- unit: hosts

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _collect_logs() -> _Collect:
    h = _Collect()
    logging.getLogger("aiter_dist").addHandler(h)
    return h


def _cross_host_worker(rank, world):
    import os

    os.environ["AITER_DIST_HOSTNAME"] = f"host{rank}"  # before the group's state is made
    import torch.distributed as dist

    import aiter_dist
    from aiter_dist.comm.workspace import group_state

    logs = _collect_logs()
    g = dist.group.WORLD
    x = torch.arange(6 * 5, dtype=torch.float32).view(6, 5) * (rank + 1)
    out = {}
    out["all_reduce"] = (aiter_dist.all_reduce(x, group=g), aiter_dist.last_path("all_reduce"))
    # An explicit kernel algorithm is overridden too: no peer memory across hosts.
    out["one_shot"] = (aiter_dist.all_reduce(x, group=g, algo="one_shot"),
                       aiter_dist.last_path("all_reduce"))
    out["all_gather"] = (aiter_dist.all_gather(x, 0, g), aiter_dist.last_path("all_gather"))
    out["reduce_scatter"] = (aiter_dist.reduce_scatter(x, 0, g),
                             aiter_dist.last_path("reduce_scatter"))
    w = torch.linspace(0.5, 1.5, 5)
    h, res = aiter_dist.all_reduce_add_rms_norm(x, torch.ones_like(x), w, 1e-6, g)
    out["fused"] = (h, res, aiter_dist.last_path("all_reduce_add_rms_norm"))
    st = group_state(g)
    try:
        aiter_dist.get_workspace(g, "cpu")
        refused = None
    except ValueError as e:
        refused = str(e)
    return out, st.eligible, st.reason, refused, logs.messages


def test_group_spanning_two_hosts_falls_back_to_torch_distributed():
    results = run_distributed(_cross_host_worker, 2)
    x = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
    total = x * 1 + x * 2
    w = torch.linspace(0.5, 1.5, 5)
    r64 = total.double() + 1
    h64 = r64 * torch.rsqrt(r64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    for rank, (out, eligible, reason, refused, logs) in enumerate(results):
        assert not eligible
        assert "spans 2 hosts" in reason and "host0: ranks [0]" in reason \
            and "host1: ranks [1]" in reason, reason
        assert refused is not None and "cannot use custom collectives" in refused \
            and "spans 2 hosts" in refused, refused
        for key in ("all_reduce", "one_shot"):
            assert out[key][1] == "torch.distributed", (key, out[key][1])
            torch.testing.assert_close(out[key][0], total, rtol=0, atol=0)
        assert out["all_gather"][1] == "torch.distributed"
        torch.testing.assert_close(out["all_gather"][0], torch.cat([x, 2 * x]), rtol=0, atol=0)
        assert out["reduce_scatter"][1] == "torch.distributed"
        torch.testing.assert_close(out["reduce_scatter"][0], total[rank * 3:(rank + 1) * 3],
                                   rtol=0, atol=0)
        h, res, path = out["fused"]
        assert path == "all_reduce + add_rms_norm", path  # composed: no fused kernel
        torch.testing.assert_close(res, r64.float())
        torch.testing.assert_close(h, h64.float())
        # Logged once per op with the reason (the hosts), not once per call.
        ar = [m for m in logs if m.startswith("aiter_dist.all_reduce:")]
        assert len(ar) == 1 and "spans 2 hosts" in ar[0] and "torch.distributed" in ar[0], logs


def _mesh_worker(rank, world):
    import os

    os.environ["AITER_DIST_HOSTNAME"] = "hostA" if rank < 2 else "hostB"
    import torch.distributed as dist

    import aiter_dist
    from aiter_dist.distributed import init_parallel_mesh

    logs = _collect_logs()
    layout = init_parallel_mesh()  # default tp: the ranks of one host
    x = torch.full((3, 5), float(rank + 1))
    tp_sum = aiter_dist.all_reduce(x, group=layout.tp_group)
    tp_path = aiter_dist.last_path("all_reduce")
    dp_sum = aiter_dist.all_reduce(x, group=layout.dp_group)  # across hosts
    dp_path = aiter_dist.last_path("all_reduce")
    try:
        init_parallel_mesh(tp=3)
        bad = None
    except ValueError as e:
        bad = str(e)
    wide = init_parallel_mesh(tp=4)  # one tp group over both hosts: allowed, falls back
    wide_sum = aiter_dist.all_reduce(x, group=wide.tp_group)
    wide_path = aiter_dist.last_path("all_reduce")
    return (layout.tp, layout.dp, layout.tp_rank, layout.dp_rank, layout.ranks_per_host,
            tuple(layout.mesh.mesh.shape), dist.get_process_group_ranks(layout.tp_group),
            tp_sum, tp_path, dp_sum, dp_path, bad, wide.dp, wide_sum, wide_path, logs.messages)


def test_mesh_keeps_tensor_parallel_inside_a_host():
    results = run_distributed(_mesh_worker, 4)
    for rank, r in enumerate(results):
        (tp, dp, tp_rank, dp_rank, per_host, shape, tp_ranks, tp_sum, tp_path, dp_sum, dp_path,
         bad, wide_dp, wide_sum, wide_path, logs) = r
        assert (tp, dp, tp_rank, dp_rank, per_host) == (2, 2, rank % 2, rank // 2, 2)
        assert shape == (2, 2)
        assert tp_ranks == [0, 1] if rank < 2 else [2, 3]
        # Inside a host: the peer-to-peer kernel (small message: one-shot on CPU).
        assert tp_path == "one_shot", tp_path
        torch.testing.assert_close(tp_sum, torch.full((3, 5), 3.0 if rank < 2 else 7.0))
        # Across hosts: torch.distributed, and still the right sum.
        assert dp_path == "torch.distributed", dp_path
        torch.testing.assert_close(dp_sum, torch.full((3, 5), float((rank % 2 + 1) * 2 + 2)))
        assert bad is not None and "tp=3 does not divide the world size 4" in bad, bad
        assert wide_dp == 1 and wide_path == "torch.distributed"
        torch.testing.assert_close(wide_sum, torch.full((3, 5), 10.0))
        if rank == 0:
            assert any("init_parallel_mesh: tp=4" in m and "more than one host" in m
                       for m in logs), logs
