"""parallelize(model, plan=...): a model that is not the example's Llama, made tensor-parallel
(and sequence-parallel) by naming its modules' styles; outputs and gradients against the
unsharded model in float64, on 2 and 3 CPU ranks."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import aiter_dist
from aiter_dist.testing import run_distributed

HIDDEN, FFN = 12, 24  # divisible by 2 and 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


PLANS = {
    "tp": {"blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise", "blocks.*.norm": "rmsnorm"},
    "sp": {"blocks.*.fc1": "colwise_sp", "blocks.*.fc2": "rowwise_sp", "blocks.*.norm": "rmsnorm"},
}


def _full_grad_slice(name, full_grad, model, rank, world):
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(owner, aiter_dist.nn.ColumnParallelLinear):
        return full_grad.chunk(world, 0)[rank]
    if isinstance(owner, aiter_dist.nn.RowParallelLinear) and name.endswith("weight"):
        return full_grad.chunk(world, 1)[rank]
    return full_grad


def _plan_vs_unsharded(rank, world, mode):
    torch.manual_seed(0)
    ref = Net().double()
    model = Net()  # fp32 (the kernels' dtypes) against the float64 reference
    model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    aiter_dist.parallelize(model, dist.group.WORLD, plan=PLANS[mode])
    counts = model.aiter_parallel
    col, row = ("colwise_sp", "rowwise_sp") if mode == "sp" else ("colwise", "rowwise")
    assert counts[col] == counts[row] == counts["rmsnorm"] == 2, counts
    tokens = 5 * world
    x = torch.randn(tokens, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(tokens, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_()
    ref(xr).backward(gy)
    rows = slice(rank * 5, (rank + 1) * 5)
    xin = (x[rows] if mode == "sp" else x).float().requires_grad_()
    out = model(xin)
    want = ref(x).detach()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), want[rows] if mode == "sp" else want, **tol)
    out.backward((gy[rows] if mode == "sp" else gy).float())
    torch.testing.assert_close(xin.grad.double(), xr.grad[rows] if mode == "sp" else xr.grad,
                               **tol)
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad
        if mode == "sp" and ".norm." in name:  # token shards: this rank's share (docstring)
            g = g.clone()
            dist.all_reduce(g)
        torch.testing.assert_close(g.double(),
                                   _full_grad_slice(name, refs[name].grad, model, rank, world),
                                   **tol, msg=lambda m: f"{name}: {m}")
    if mode == "sp":
        assert aiter_dist.last_path("all_gather_gemm") == "overlapped"
        assert aiter_dist.last_path("gemm_reduce_scatter") == "overlapped"
    return True


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", sorted(PLANS))
def test_plan_parallelizes_any_model(mode, world):
    run_distributed(_plan_vs_unsharded, world, mode)


@pytest.mark.parametrize("plan, message", [
    ({"blocks.*.fc1": "diagonal"}, "unknown plan style"),
    ({"blocks.*.fc9": "colwise"}, "matches no module"),
    ({"blocks.*.norm": "colwise"}, "takes an nn.Linear"),
    ({"blocks.0.fc1": "colwise", "blocks.*.fc1": "rowwise"}, "two styles"),
    ({"blocks.*.fc1": "rmsnorm"}, "an RMSNorm"),
])
def test_bad_plans_are_named(plan, message):
    with pytest.raises(ValueError, match=message):
        aiter_dist.parallelize(Net(), plan=plan)
