"""RMSNorm and add+RMSNorm: forward and all gradients against a float64 reference."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels import rmsnorm as K
from aiter_dist.testing import assert_close_to_ref

CPU_SHAPES = [(1, 1), (7, 33), (3, 5, 64), (130, 100), (2, 257)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(x, residual, w, g, g_res, eps, device):
    """Ours, float64 reference and PyTorch-in-dtype for the same inputs: outputs and grads."""
    def go(fn_norm, fn_add, cast):
        xs = cast(x).requires_grad_()
        ws = cast(w).requires_grad_()
        if residual is None:
            out = fn_norm(xs, ws, eps)
            out.backward(cast(g))
            return [out, xs.grad, ws.grad]
        rs = cast(residual).requires_grad_()
        out, res_out = fn_add(xs, rs, ws, eps)
        (out * cast(g)).sum().backward(retain_graph=True)
        (res_out * cast(g_res)).sum().backward()
        return [out, res_out, xs.grad, rs.grad, ws.grad]

    ours = go(aiter_dist.rms_norm, aiter_dist.add_rms_norm, lambda t: t.detach().to(device))
    ref = go(K.rms_norm_ref, K.add_rms_norm_ref, lambda t: t.detach().to(device, torch.float64))
    low = go(K.rms_norm_ref, K.add_rms_norm_ref, lambda t: t.detach().to(device))
    return ours, ref, low


def _check(shape, dtype, fused, device, eps=1e-6):
    g = torch.Generator().manual_seed(hash((shape, str(dtype), fused)) % 2**31)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    residual = torch.randn(shape, generator=g).to(dtype) if fused else None
    go = torch.randn(shape, generator=g).to(dtype)
    gr = torch.randn(shape, generator=g).to(dtype)
    ours, ref, low = _run(x, residual, w, go, gr, eps, device)
    names = ["out", "residual_out", "dx", "dresidual", "dweight"] if fused else ["out", "dx", "dweight"]
    for name, o, r, t in zip(names, ours, ref, low):
        assert o.dtype == t.dtype
        assert_close_to_ref(f"{name} {shape} {dtype}", o, r, t)


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_rmsnorm_cpu(shape, dtype, fused):
    _check(shape, dtype, fused, "cpu")
    assert aiter_dist.last_path("add_rms_norm" if fused else "rms_norm").startswith("triton")


def test_residual_out_is_exact_sum_and_out_normalizes_it():
    x, r = torch.randn(9, 40), torch.randn(9, 40)
    w = torch.randn(40)
    out, res = aiter_dist.add_rms_norm(x, r, w)
    assert torch.equal(res, x + r)
    torch.testing.assert_close(out, aiter_dist.rms_norm(res, w), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_wide_row_path(fused):
    """Rows wider than the fused limit take the chunked two-pass kernels (forced small here)."""
    M, N = 5, 300
    x = torch.randn(M, N, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(N).requires_grad_()
    r = torch.randn(M, N) if fused else None
    y, res_out, rstd = K.rms_norm_fwd(x.detach(), w.detach(), 1e-6, residual=r,
                                      config=(2, 64, 5, 1))
    src = x.detach() + r if fused else x.detach()
    torch.testing.assert_close(y, K.rms_norm_ref(src, w.detach()), rtol=1e-5, atol=1e-5)
    dy = torch.randn(M, N)
    dres = torch.randn(M, N) if fused else None  # the incoming gradient of residual_out
    dx, dw = K.rms_norm_bwd(dy, src, w.detach(), rstd, dresidual=dres, max_n=64)
    src64 = src.double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    K.rms_norm_ref(src64, w64).backward(dy.double())
    expected_dx = src64.grad + (dres.double() if fused else 0)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_unmasked_even_tiling():
    """Shapes the blocks tile exactly take the unmasked kernel; compare with a masked config."""
    x, w = torch.randn(8, 32), torch.randn(32)
    even, _, _ = K.rms_norm_fwd(x, w, 1e-6, config=(4, 32, 1, 1))
    masked, _, _ = K.rms_norm_fwd(x, w, 1e-6, config=(4, 64, 1, 1))
    torch.testing.assert_close(even, K.rms_norm_ref(x, w))
    torch.testing.assert_close(even, masked, rtol=0, atol=0)
    r = torch.randn(8, 32)
    even_out, even_res, _ = K.rms_norm_fwd(x, w, 1e-6, residual=r, config=(4, 32, 1, 1))
    masked_out, masked_res, _ = K.rms_norm_fwd(x, w, 1e-6, residual=r, config=(4, 64, 1, 1))
    assert torch.equal(even_res, x + r) and torch.equal(even_res, masked_res)
    torch.testing.assert_close(even_out, masked_out, rtol=0, atol=0)


def test_row_strided_input_and_fp32_weight_with_half_input():
    base = torch.randn(6, 80)
    x = base[:, :48]  # rows strided, last dim contiguous
    w = torch.randn(48)
    torch.testing.assert_close(aiter_dist.rms_norm(x, w), K.rms_norm_ref(x, w))
    xh = torch.randn(4, 24).half()
    y = aiter_dist.rms_norm(xh, torch.randn(24))
    assert y.dtype == torch.float16


def test_empty_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = aiter_dist.rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))


@pytest.mark.parametrize("shape", [(5, 0), (0, 0), (2, 0, 3), (3, 4, 0)], ids=str)
def test_zero_size_inputs_give_empty_outputs(shape):
    """Like F.rms_norm: an empty output of the input's shape, and gradients of the right shapes
    (dweight zeros), both ops, through the recorded PyTorch path (nothing to launch)."""
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True)
    w = torch.ones(shape[-1], requires_grad=True)
    y = aiter_dist.rms_norm(x, w)
    assert y.shape == shape and y.dtype == x.dtype
    assert y.shape == torch.nn.functional.rms_norm(x, (shape[-1],), w).shape
    assert aiter_dist.last_path("rms_norm") == "torch"
    out, res = aiter_dist.add_rms_norm(x, r, w)
    assert out.shape == res.shape == shape
    assert aiter_dist.last_path("add_rms_norm") == "torch"
    (y.sum() + out.sum() + res.sum()).backward()
    assert x.grad.shape == r.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros(shape[-1]))


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_float64_takes_recorded_torch_path(fused):
    """float64 is computed in float64 by PyTorch ops (the kernels are fp32 inside): exact
    against the float64 reference, gradients checked numerically."""
    g = torch.Generator().manual_seed(5)
    x, r = (torch.randn(6, 37, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(2))
    w = (1 + 0.3 * torch.randn(37, generator=g, dtype=torch.float64)).requires_grad_()
    if fused:
        out, res = aiter_dist.add_rms_norm(x, r, w)
        ref, ref_res = K.add_rms_norm_ref(x, r, w)
        assert torch.equal(res, ref_res)
        assert torch.autograd.gradcheck(aiter_dist.add_rms_norm, (x, r, w))
    else:
        out, ref = aiter_dist.rms_norm(x, w), K.rms_norm_ref(x, w)
        assert torch.autograd.gradcheck(aiter_dist.rms_norm, (x, w))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    assert aiter_dist.last_path("add_rms_norm" if fused else "rms_norm") == "torch"
    assert aiter_dist.last_path("rms_norm_bwd") == "torch"
    # The module too, and a float64 weight under a float32 input (output stays float32).
    norm = aiter_dist.nn.RMSNorm(37, dtype=torch.float64)
    torch.testing.assert_close(norm(x), K.rms_norm_ref(x, norm.weight))
    assert aiter_dist.rms_norm(x.detach().float(), w.detach()).dtype == torch.float32


def test_bad_input():
    with pytest.raises(ValueError, match="rms_norm: weight must have shape"):
        aiter_dist.rms_norm(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(TypeError, match="rms_norm: x has dtype torch.int64"):
        aiter_dist.rms_norm(torch.ones(4, 8, dtype=torch.long), torch.randn(8))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        aiter_dist.rms_norm(torch.randn(8, 4).t(), torch.randn(8))
    with pytest.raises(TypeError, match="add_rms_norm: residual dtype"):
        aiter_dist.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8).half(), torch.randn(8))
    with pytest.raises(ValueError, match="add_rms_norm: residual shape"):
        aiter_dist.add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.randn(8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        aiter_dist.rms_norm([1.0], torch.randn(1))


def test_module():
    norm = aiter_dist.nn.RMSNorm(24, eps=1e-5)
    x = torch.randn(3, 24)
    torch.testing.assert_close(norm(x), K.rms_norm_ref(x, norm.weight.detach(), 1e-5))
    out, res = norm(x, x)
    torch.testing.assert_close(res, 2 * x)


# ----------------------------------------------------------------------------- GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (16384, 4096), (4099, 8192), (1000, 5120),
                                   (17, 100000)],
                         ids=str)
def test_rmsnorm_gpu(shape, dtype, fused):
    _check(shape, dtype, fused, "cuda")
    assert aiter_dist.last_path("add_rms_norm" if fused else "rms_norm") == "triton"


@pytest.mark.gpu
def test_float64_on_gpu_takes_recorded_torch_path():
    x = torch.randn(5, 33, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, device="cuda", requires_grad=True)
    y = aiter_dist.rms_norm(x, w)
    assert aiter_dist.last_path("rms_norm") == "torch" and y.dtype == torch.float64
    torch.testing.assert_close(y, K.rms_norm_ref(x, w), rtol=1e-14, atol=1e-14)
    y.sum().backward()
    assert w.grad.dtype == torch.float64 and aiter_dist.last_path("rms_norm_bwd") == "torch"


@pytest.mark.gpu
def test_cpu_tensor_on_gpu_host_takes_recorded_torch_path():
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    _check((5, 33), torch.float32, True, "cpu")
    assert aiter_dist.last_path("add_rms_norm") == "torch"
    y = aiter_dist.rms_norm(x, w)
    assert aiter_dist.last_path("rms_norm") == "torch"
    torch.testing.assert_close(y, K.rms_norm_ref(x, w))
    torch.testing.assert_close(aiter_dist.rms_norm(x.cuda(), w.cuda()).cpu(), y, rtol=1e-5,
                               atol=1e-5)
    assert aiter_dist.last_path("rms_norm") == "triton"


def test_64bit_offset_branch_and_predicate():
    """Huge tensors switch to int64 offsets; run that branch on a small tensor to check it."""
    assert K._needs_64bit_offsets(2**20, 2**12, 2**12)  # 2**20 rows of 4096
    assert not K._needs_64bit_offsets(1024, 4096, 4096)
    assert K._needs_64bit_offsets(1024, 64, 2**21)  # few narrow rows, far apart
    x, w = torch.randn(6, 40), torch.randn(40)
    y, rstd = torch.empty_like(x), torch.empty(6)
    K.launch(K._rms_norm_fwd_kernel, (3,), x.device, x, x, w, y, y, rstd, 6, 40, 40, 40, 40, 40,
             1e-6, HAS_RESIDUAL=False, BLOCK_M=2, BLOCK_N=64, NUM_CHUNKS=1, EVEN=False,
             OFFSETS_64=True, num_warps=1)
    torch.testing.assert_close(y, K.rms_norm_ref(x, w))
