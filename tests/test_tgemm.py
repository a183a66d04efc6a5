"""tgemm.mm: input @ weight.T + bias, the GEMM entry point every linear goes through."""
import pytest
import torch

import aiter_dist
from aiter_dist.testing import assert_close_to_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 5), (7, 17, 9), (2, 4, 33, 20)], ids=str)
def test_mm_matches_reference_and_grads(shape, dtype):
    *lead, k, n = shape
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    w = torch.randn(n, k).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_()
    out = aiter_dist.tgemm.mm(x, w, b)
    assert aiter_dist.last_path("tgemm.mm") == "torch.linear"
    ref = x.double() @ w.double().T + b.double()
    assert_close_to_ref("mm", out, ref.detach(), (x @ w.T + b).detach())
    out.sum().backward()
    torch.testing.assert_close(b.grad.double(), torch.full((n,), float(x[..., 0].numel()),
                                                           dtype=torch.float64))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_otype_and_no_bias():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    out = aiter_dist.tgemm.mm(x, w, otype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (x @ w.T).half())


def test_bad_input():
    mm = aiter_dist.tgemm.mm
    with pytest.raises(ValueError, match="tgemm.mm: input's last dimension 6 must equal"):
        mm(torch.randn(2, 6), torch.randn(3, 5))
    with pytest.raises(ValueError, match="tgemm.mm: weight must be 2-D"):
        mm(torch.randn(2, 6), torch.randn(6))
    with pytest.raises(ValueError, match=r"tgemm.mm: bias must have shape \(3,\)"):
        mm(torch.randn(2, 6), torch.randn(3, 6), torch.randn(4))
    with pytest.raises(TypeError, match="tgemm.mm: input dtype torch.float16 differs"):
        mm(torch.randn(2, 6).half(), torch.randn(3, 6))
    with pytest.raises(TypeError, match="otype must be"):
        mm(torch.randn(2, 6), torch.randn(3, 6), otype=torch.int32)


@pytest.mark.gpu
def test_mm_gpu_bf16():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    ref = (x.double() @ w.double().T)
    assert_close_to_ref("mm gpu", aiter_dist.tgemm.mm(x, w), ref, x @ w.T)
