"""Tensor-parallel linears against the unsharded nn.Linear: outputs, input gradients (complete on
every rank) and weight gradients (each rank's shard of the full gradient)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import aiter_dist
from aiter_dist.nn import ColumnParallelLinear, RowParallelLinear
from aiter_dist.testing import assert_close_to_ref, gpu_world, run_distributed, run_gpu_ranks


def _device():
    return aiter_dist.local_device()


def _layers_vs_unsharded(rank, world, batch, in_f, out_f, dtype_name):
    dtype = getattr(torch, dtype_name)
    dev = _device()
    floor = None if dtype == torch.float32 else 3e-2  # 16-bit grads: sums of rounded products
    torch.manual_seed(0)  # same full layer and data on every rank
    full = nn.Linear(in_f, out_f, bias=True).to(dev, torch.float64)
    x = torch.randn(batch, 3, in_f, device=dev, dtype=torch.float64)
    gy = torch.randn(batch, 3, out_f, device=dev, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    full(xr).backward(gy)
    ref_out = full(x).detach()
    lin_lp = nn.Linear(in_f, out_f).to(dev, dtype)  # PyTorch in the same dtype: the error budget
    lin_lp.load_state_dict(full.state_dict())
    torch_out = lin_lp(x.to(dtype)).detach()
    in_shard = slice(rank * in_f // world, (rank + 1) * in_f // world)
    out_shard = slice(rank * out_f // world, (rank + 1) * out_f // world)
    checked = []
    for cls, kwargs in ((ColumnParallelLinear, {}), (ColumnParallelLinear, {"gather_output": True}),
                        (RowParallelLinear, {}), (RowParallelLinear, {"input_is_parallel": False})):
        layer = cls.from_linear(full.to(dtype), **kwargs)
        full.to(torch.float64)
        name = f"{cls.__name__} {kwargs}"
        xin = x.to(dtype)
        if cls is RowParallelLinear and kwargs.get("input_is_parallel", True):
            xin = xin[..., in_shard].contiguous()
        xin.requires_grad_()
        out = layer(xin)
        sharded_out = cls is ColumnParallelLinear and not kwargs
        rows = out_shard if sharded_out else slice(None)
        assert_close_to_ref(f"{name} out", out, ref_out[..., rows], torch_out[..., rows])
        out.backward(gy[..., rows].to(dtype))
        # Input gradient: complete on every rank (this rank's shard for a parallel input).
        gx = xr.grad if xin.shape[-1] == in_f else xr.grad[..., in_shard]
        assert_close_to_ref(f"{name} dx", xin.grad, gx, floor=floor)
        # Weight and bias gradients: this rank's shard of the full layer's.
        if cls is ColumnParallelLinear:
            assert_close_to_ref(f"{name} dW", layer.weight.grad, full.weight.grad[out_shard],
                                floor=floor)
            assert_close_to_ref(f"{name} db", layer.bias.grad, full.bias.grad[out_shard],
                                floor=floor)
        else:
            assert_close_to_ref(f"{name} dW", layer.weight.grad, full.weight.grad[:, in_shard],
                                floor=floor)
            assert_close_to_ref(f"{name} db", layer.bias.grad, full.bias.grad, floor=floor)
        checked.append(name)
    return checked


def _fresh_layers_are_shards_of_one_layer(rank, world):
    """Constructed directly (same seed on every rank), the shards form one nn.Linear-like layer."""
    torch.manual_seed(7)
    col = ColumnParallelLinear(6, 4 * world)
    torch.manual_seed(7)
    row = RowParallelLinear(4 * world, 6)
    parts = [torch.empty_like(col.weight) for _ in range(world)]
    dist.all_gather(parts, col.weight.detach())
    assert all(not torch.equal(parts[0], p) for p in parts[1:]), "shards repeat each other"
    biases = [torch.empty_like(row.bias) for _ in range(world)]
    dist.all_gather(biases, row.bias.detach())
    assert all(torch.equal(biases[0], b) for b in biases), "replicated bias differs across ranks"
    torch.manual_seed(7)
    ref = nn.Linear(6, 4 * world)  # the same RNG draws as the full layer behind the shards
    assert torch.equal(torch.cat(parts), ref.weight.detach())
    return True


def test_fresh_layers_are_shards_of_one_layer():
    run_distributed(_fresh_layers_are_shards_of_one_layer, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_linears_cpu(world):
    run_distributed(_layers_vs_unsharded, world, 2, 6 * world, 3 * world, "float32")


def test_parallel_linears_cpu_half():
    run_distributed(_layers_vs_unsharded, 2, 3, 10, 14, "float16")


def _sequence_parallel_layers(rank, world):
    """sequence_parallel=True: the column-parallel layer takes this rank's tokens and computes
    all of them (all_gather_gemm), the row-parallel one returns this rank's tokens of the reduced
    output (gemm_reduce_scatter); outputs and every gradient against the unsharded float64 layer."""
    dev = _device()
    torch.manual_seed(0)
    m, in_f, out_f = 5, 2 * world + 3, 3 * world
    in_f -= in_f % world
    full = nn.Linear(in_f, out_f).to(dev, torch.float64)
    x = torch.randn(world * m, in_f, device=dev, dtype=torch.float64)
    gy = torch.randn(world * m, out_f, device=dev, dtype=torch.float64)
    w, b = full.weight.detach(), full.bias.detach()
    rows = slice(rank * m, (rank + 1) * m)
    cols_out = slice(rank * out_f // world, (rank + 1) * out_f // world)
    cols_in = slice(rank * in_f // world, (rank + 1) * in_f // world)
    kw = dict(rtol=1e-4, atol=1e-5)

    col = ColumnParallelLinear.from_linear(full.float(), sequence_parallel=True)
    full.double()
    xs = x[rows].float().requires_grad_()
    y = col(xs)
    torch.testing.assert_close(y.double(), (x @ w.T + b)[:, cols_out], **kw)
    y.backward(gy[:, cols_out].float())
    torch.testing.assert_close(xs.grad.double(), (gy @ w)[rows], **kw)
    torch.testing.assert_close(col.weight.grad.double(), (gy.T @ x)[cols_out], **kw)
    torch.testing.assert_close(col.bias.grad.double(), gy.sum(0)[cols_out], **kw)
    # (CPU ranks take the overlapped path at every size; GPUs gate small problems)
    paths = ("overlapped",) if dev.type == "cpu" else ("overlapped", "all_gather+gemm")
    assert aiter_dist.last_path("all_gather_gemm") in paths

    row = RowParallelLinear.from_linear(full.float(), sequence_parallel=True)
    full.double()
    xp = x[:, cols_in].float().requires_grad_()
    y = row(xp)
    torch.testing.assert_close(y.double(), (x @ w.T + b)[rows], **kw)
    y.backward(gy[rows].float())
    torch.testing.assert_close(xp.grad.double(), (gy @ w)[:, cols_in], **kw)
    torch.testing.assert_close(row.weight.grad.double(), (gy.T @ x)[:, cols_in], **kw)
    torch.testing.assert_close(row.bias.grad.double(), gy.sum(0), **kw)  # whole, every rank
    paths = ("overlapped",) if dev.type == "cpu" else ("overlapped", "gemm+reduce_scatter")
    assert aiter_dist.last_path("gemm_reduce_scatter") in paths
    with pytest.raises(ValueError, match="choose one"):
        ColumnParallelLinear(4, 2 * world, sequence_parallel=True, gather_output=True)
    with pytest.raises(ValueError, match="input_is_parallel=True"):
        RowParallelLinear(2 * world, 4, sequence_parallel=True, input_is_parallel=False)
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_layers_overlap_their_communication(world):
    run_distributed(_sequence_parallel_layers, world)


def _bad_sizes(rank, world):
    with pytest.raises(ValueError, match="ColumnParallelLinear: out_features=5 is not divisible"):
        ColumnParallelLinear(4, 5)
    with pytest.raises(ValueError, match="RowParallelLinear: in_features=7 is not divisible"):
        RowParallelLinear(7, 4)
    layer = RowParallelLinear(8, 4)
    with pytest.raises(ValueError, match="must be this rank's shard 4"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"load_full_weight: expected a \(4, 8\) weight"):
        layer.load_full_weight(torch.randn(8, 4))
    return True


def test_bad_sizes():
    run_distributed(_bad_sizes, 2)


def test_layers_without_a_process_group_are_plain_linears():
    full = nn.Linear(6, 4)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls.from_linear(full) if not dist.is_initialized() else None
        if layer is None:
            pytest.skip("a process group is initialized in this process")
        x = torch.randn(5, 6)
        torch.testing.assert_close(layer(x), full(x))


@pytest.mark.multigpu
def test_parallel_linears_gpu_bf16():
    world = gpu_world()
    run_gpu_ranks(_layers_vs_unsharded, 8, 1024 * world, 512 * world, "bfloat16")
