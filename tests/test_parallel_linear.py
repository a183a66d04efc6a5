"""Tensor-parallel linears against the unsharded nn.Linear: outputs, input gradients (complete on
every rank) and weight gradients (each rank's shard of the full gradient)."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import aiter_dist
from aiter_dist.nn import ColumnParallelLinear, RowParallelLinear
from aiter_dist.testing import assert_close_to_ref, run_distributed


def _device():
    return aiter_dist.local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _layers_vs_unsharded(rank, world, batch, in_f, out_f, dtype_name):
    dtype = getattr(torch, dtype_name)
    dev = _device()
    torch.manual_seed(0)  # same full layer and data on every rank
    full = nn.Linear(in_f, out_f, bias=True).to(dev, torch.float64)
    x = torch.randn(batch, 3, in_f, device=dev, dtype=torch.float64)
    gy = torch.randn(batch, 3, out_f, device=dev, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    full(xr).backward(gy)
    ref_out = full(x).detach()
    lin_lp = nn.Linear(in_f, out_f).to(dev, dtype)  # PyTorch in the same dtype: the error budget
    lin_lp.load_state_dict(full.state_dict())
    torch_out = lin_lp(x.to(dtype))
    checked = []
    for cls, kwargs in ((ColumnParallelLinear, {}), (ColumnParallelLinear, {"gather_output": True}),
                        (RowParallelLinear, {}), (RowParallelLinear, {"input_is_parallel": False})):
        layer = cls.from_linear(full.to(dtype), **kwargs)
        full.to(torch.float64)
        xin = x.to(dtype)
        shard = slice(rank * in_f // world, (rank + 1) * in_f // world)
        if cls is RowParallelLinear and kwargs.get("input_is_parallel", True):
            xin = xin[..., shard].contiguous()
        xin.requires_grad_()
        out = layer(xin)
        if cls is ColumnParallelLinear and not kwargs:
            rows = slice(rank * out_f // world, (rank + 1) * out_f // world)
            assert_close_to_ref("column out", out, ref_out[..., rows], torch_out[..., rows])
            out.backward(gy[..., rows].to(dtype))
            assert_close_to_ref("column dW", layer.weight.grad, full.weight.grad[rows], floor=3e-2)
        else:
            assert_close_to_ref(f"{cls.__name__} {kwargs} out", out, ref_out, torch_out)
            out.backward(gy.to(dtype))
        # The input gradient is complete on every rank (its shard for a parallel input).
        gx = xr.grad[..., shard] if xin.shape[-1] != in_f else xr.grad
        assert_close_to_ref(f"{cls.__name__} {kwargs} dx", xin.grad, gx, floor=3e-2)
        checked.append(cls.__name__)
    return checked


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_linears_cpu(world):
    run_distributed(_layers_vs_unsharded, world, 2, 6 * world, 3 * world, "float32")


def test_parallel_linears_cpu_half():
    run_distributed(_layers_vs_unsharded, 2, 3, 10, 14, "float16")


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
    world = torch.cuda.device_count()
    run_distributed(_layers_vs_unsharded, world, 8, 1024 * world, 512 * world, "bfloat16",
                    backend="nccl")
