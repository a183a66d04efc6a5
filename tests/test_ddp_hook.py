"""aiter_dist.ddp_comm_hook on 2 CPU ranks (gloo + the /dev/shm workspace): a model wrapped in
DistributedDataParallel with the hook gets the same gradients as with DDP's own all-reduce, over
several buckets, with aiter_dist's kernel serving them."""
from __future__ import annotations

import functools

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import aiter_dist
from aiter_dist.testing import run_distributed

# ~0.5 KB buckets: the model below (7 tensors of 0.06-1 KB) spans several once DDP rebuilds its
# buckets after the first backward (which puts every gradient in one bucket).
BUCKET_MB = 0.0005


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4, bias=False)).to(dtype)


def _batch(rank, step, dtype):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(5 + 2 * rank, 10, generator=g).to(dtype), \
        torch.randint(0, 4, (5 + 2 * rank,), generator=g)


def _counting_hook(state, bucket):
    state["numels"][-1].append(bucket.buffer().numel())
    fut = aiter_dist.ddp_comm_hook(state["group"], bucket)
    state["paths"].append(aiter_dist.last_path("ddp_comm_hook"))
    return fut


def _grads_with_and_without_hook(rank, world, dtype):
    """Two steps (the second after DDP rebuilds its buckets) of the same model under DDP's default
    all-reduce and under the hook; returns both runs' gradients, each step's local gradients
    (no DDP) and the hook's record."""
    out = {}
    for hooked in (False, True, "direct"):
        local = _model(dtype)
        model = DDP(_model(dtype), bucket_cap_mb=BUCKET_MB)
        state = {"group": None, "numels": [], "paths": []}
        if hooked == "direct":  # the public hook as users register it (DDP checks its signature)
            model.register_comm_hook(None, aiter_dist.ddp_comm_hook)
        elif hooked:
            model.register_comm_hook(state, _counting_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for step in range(2):
            x, y = _batch(rank, step, dtype)
            with torch.no_grad():
                for p, q in zip(local.parameters(), model.module.parameters()):
                    p.copy_(q)
            local.zero_grad()
            torch.nn.functional.cross_entropy(local(x).float(), y).backward()
            opt.zero_grad()
            state["numels"].append([])  # the buckets of this step's backward
            torch.nn.functional.cross_entropy(model(x).float(), y).backward()
            steps.append(([p.grad.clone() for p in model.parameters()],
                          [p.grad.clone() for p in local.parameters()]))
            opt.step()
        out[hooked] = (steps, state)
    return out


@functools.lru_cache(maxsize=None)
def _run(dtype):
    return run_distributed(_grads_with_and_without_hook, 2, dtype)


def _check(dtype, atol, rtol):
    ranks = _run(dtype)
    for r, res in enumerate(ranks):
        default_steps, _ = res[False]
        hooked_steps, state = res[True]
        direct_steps, _ = res["direct"]
        for step in range(2):
            for g_default, g_hook, g_direct in zip(default_steps[step][0], hooked_steps[step][0],
                                                   direct_steps[step][0]):
                torch.testing.assert_close(g_hook, g_default, atol=atol, rtol=rtol)
                torch.testing.assert_close(g_direct, g_hook, atol=0, rtol=0)
            # And the hook's gradient is the mean of the ranks' local gradients.
            locals_ = [ranks[k][True][0][step][1] for k in range(2)]
            for i, g in enumerate(hooked_steps[step][0]):
                mean = (locals_[0][i].double() + locals_[1][i].double()) / 2
                torch.testing.assert_close(g.double(), mean, atol=atol, rtol=rtol)
        # The hook is called for every bucket, covering every parameter each step; several
        # buckets from the second step on.
        n_params = sum(p.numel() for p in _model(dtype).parameters())
        assert all(sum(b) == n_params for b in state["numels"]), state["numels"]
        assert len(state["numels"][1]) >= 3, state["numels"]
        # Both ranks made the same calls (the collectives require it).
        assert state["numels"] == ranks[0][True][1]["numels"]
    return ranks[0][True][1]["paths"]


def test_fp32_buckets_match_ddp_default_and_take_our_kernel():
    paths = _check(torch.float32, atol=1e-6, rtol=1e-5)
    assert set(paths) == {"one_shot"}


def test_fp64_buckets_go_to_torch_distributed():
    paths = _check(torch.float64, atol=1e-12, rtol=1e-12)
    assert set(paths) == {"torch.distributed"}
