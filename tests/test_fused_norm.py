"""all_reduce_add_rms_norm: the fused kernel against add_rms_norm(all_reduce(x)) and float64."""
import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.comm.fused_norm import all_reduce_add_rms_norm_ref
from aiter_dist.testing import assert_close_to_ref, run_distributed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _device():
    return aiter_dist.local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _fused_vs_reference(rank, world, shapes):
    from aiter_dist.comm import get_workspace

    dev = _device()
    for dtype in DTYPES:
        for shape in shapes:
            g = torch.Generator().manual_seed(sum(shape))
            xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(world)]
            residual = torch.randn(shape, generator=g).to(dtype)
            weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
            out, res_out = aiter_dist.all_reduce_add_rms_norm(
                xs[rank].to(dev), residual.to(dev), weight.to(dev), algo="one_shot")
            assert aiter_dist.last_path("all_reduce_add_rms_norm") == "one_shot"
            unfused_out, unfused_res = aiter_dist.add_rms_norm(
                aiter_dist.all_reduce(xs[rank].to(dev), algo="one_shot"), residual.to(dev),
                weight.to(dev))
            # residual_out: the same sum, rounded the same way, as the unfused composition.
            assert torch.equal(res_out, unfused_res), (dtype, shape)
            torch.testing.assert_close(out, unfused_out, rtol=0, atol=0 if dtype ==
                                       torch.float32 else 2e-2)
            ref_out, ref_res = all_reduce_add_rms_norm_ref(
                [x.double() for x in xs], residual.double(), weight.double())
            low_out, _ = all_reduce_add_rms_norm_ref(xs, residual, weight)
            assert_close_to_ref(f"out {dtype} {shape}", out.cpu(), ref_out, low_out)
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(t, out) for t in gathered), "ranks disagree"
    assert get_workspace(device=dev).signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_fused_matches_unfused_cpu(world):
    run_distributed(_fused_vs_reference, world, [(1, 8), (7, 33), (2, 5, 64)])


def _grads_and_paths(rank, world):
    torch.manual_seed(0)
    x = torch.randn(6, 20, requires_grad=True)
    residual = torch.randn(6, 20, requires_grad=True)
    weight = torch.randn(20, requires_grad=True)
    gy, gr = torch.randn(6, 20), torch.randn(6, 20)
    out, res = aiter_dist.all_reduce_add_rms_norm(x, residual, weight, algo="one_shot")
    ((out * gy).sum() + (res * gr).sum()).backward()
    x2, r2, w2 = (t.detach().clone().requires_grad_() for t in (x, residual, weight))
    o2, res2 = aiter_dist.add_rms_norm(aiter_dist.all_reduce(x2), r2, w2)
    ((o2 * gy).sum() + (res2 * gr).sum()).backward()
    for a, b in ((x.grad, x2.grad), (residual.grad, r2.grad), (weight.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    wide = torch.randn(2, 20000)
    aiter_dist.all_reduce_add_rms_norm(wide, wide, torch.ones(20000))
    assert aiter_dist.last_path("all_reduce_add_rms_norm") == "all_reduce + add_rms_norm"
    with pytest.raises(TypeError, match="all_reduce_add_rms_norm: residual dtype"):
        aiter_dist.all_reduce_add_rms_norm(x.detach(), residual.detach().half(), weight.detach())
    return True


def test_gradients_fallback_and_bad_input_cpu():
    run_distributed(_grads_and_paths, 2)


@pytest.mark.multigpu
def test_fused_matches_unfused_gpu():
    run_distributed(_fused_vs_reference, torch.cuda.device_count(),
                    [(1, 4096), (333, 4096), (64, 8192)], backend="nccl")
