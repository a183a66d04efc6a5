"""SwiGLU (silu(gate) * up): output and both gradients against a float64 reference, row-strided
views read in place, other layouts copied visibly, bad input, torch.compile and opcheck."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels import swiglu as S
from aiter_dist.testing import OPCHECK, assert_close_to_ref, assert_compiled_matches_eager

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(gate, up, dy, name):
    """Ours vs the float64 reference vs PyTorch in the inputs' dtype: y, dgate, dup."""
    results = []
    for fn, cast in ((aiter_dist.swiglu, lambda t: t), (S.swiglu_ref, lambda t: t.double()),
                     (S.swiglu_ref, lambda t: t)):
        g = cast(gate.detach()).requires_grad_()
        u = cast(up.detach()).requires_grad_()
        y = fn(g, u)
        y.backward(cast(dy))
        results.append((y, g.grad, u.grad))
    ours, ref, low = results
    assert ours[0].dtype == gate.dtype and ours[0].shape == gate.shape
    for label, o, r, t in zip(("y", "dgate", "dup"), ours, ref, low):
        assert o.is_contiguous()
        assert_close_to_ref(f"{name} {label}", o, r, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (7, 13), (3, 5, 37), (2, 1, 257), (13, 300)],
                         ids=str)
def test_swiglu(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 101 + sum(shape))
    gate = (3 * torch.randn(shape, generator=g)).to(dtype)  # wide enough to reach silu's tails
    up = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    _check(gate, up, dy, f"{shape} {dtype}")
    assert aiter_dist.last_path("swiglu") == "triton-interpreter"
    assert aiter_dist.last_path("swiglu_bwd") == "triton-interpreter"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_halves_of_a_fused_projection_are_read_in_place(dtype):
    """gate/up = gu.chunk(2, -1): row-strided views, no copy (no layout record); gradients flow
    back into the fused tensor's two halves."""
    g = torch.Generator().manual_seed(7)
    gu = torch.randn(3, 5, 2 * 37, generator=g).to(dtype)
    dy = torch.randn(3, 5, 37, generator=g).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    before = aiter_dist.last_path("swiglu_layout"), aiter_dist.last_path("swiglu_bwd_layout")
    _check(gate, up, dy, f"chunked {dtype}")
    assert (aiter_dist.last_path("swiglu_layout"),
            aiter_dist.last_path("swiglu_bwd_layout")) == before
    # The views' result equals the contiguous inputs' bit for bit.
    assert torch.equal(aiter_dist.swiglu(gate, up),
                       aiter_dist.swiglu(gate.contiguous(), up.contiguous()))
    leaf = gu.detach().clone().requires_grad_()
    a, b = leaf.chunk(2, dim=-1)
    aiter_dist.swiglu(a, b).backward(dy)
    ga = a.detach().clone().requires_grad_()
    gb = b.detach().clone().requires_grad_()
    aiter_dist.swiglu(ga, gb).backward(dy)
    assert torch.equal(leaf.grad, torch.cat([ga.grad, gb.grad], -1))


def test_other_layouts_are_copied_visibly():
    g = torch.Generator().manual_seed(9)
    gate = torch.randn(6, 11, generator=g).t()  # last dim not contiguous
    up = torch.randn(11, 6, generator=g)
    y = aiter_dist.swiglu(gate, up)
    assert aiter_dist.last_path("swiglu_layout") == "copied"
    torch.testing.assert_close(y, S.swiglu_ref(gate, up))
    # A stride-0 incoming gradient (out.sum().backward()) is copied too, and correct.
    gate = gate.detach().requires_grad_()
    aiter_dist.swiglu(gate, up).sum().backward()
    g64 = gate.detach().double().requires_grad_()
    S.swiglu_ref(g64, up.double()).sum().backward()
    torch.testing.assert_close(gate.grad.double(), g64.grad, rtol=1e-6, atol=1e-6)
    assert aiter_dist.last_path("swiglu_bwd_layout") == "copied"


def test_extreme_values():
    """Large |gate|: sigmoid saturates (exp overflows to inf for very negative gate) and both
    output and gradients stay finite and match the reference."""
    gate = torch.tensor([-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, 1e4])
    up = torch.linspace(-2, 2, 8)
    gate.requires_grad_()
    y = aiter_dist.swiglu(gate, up)
    y.backward(torch.ones(8))
    g64 = gate.detach().double().requires_grad_()
    ref = S.swiglu_ref(g64, up.double())
    ref.backward(torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gate.grad.double(), g64.grad, rtol=1e-6, atol=1e-6)


def test_even_and_masked_tiles_agree():
    """Tiles that cover the problem exactly take the unmasked kernel: the same bits as a
    masked config, forward and backward, flat and row-strided."""
    g = torch.Generator().manual_seed(11)
    gu = torch.randn(8, 64, generator=g)
    dy = torch.randn(8, 32, generator=g)
    for gate, up in (gu.chunk(2, -1), (gu[:, :32].contiguous(), gu[:, 32:].contiguous())):
        m = 1 if gate.is_contiguous() else 8
        even_cfg = (1, 256, 1) if m == 1 else (4, 32, 1)
        masked_cfg = (1, 512, 1) if m == 1 else (4, 64, 1)
        even = S.swiglu_fwd(gate, up, config=even_cfg)
        masked = S.swiglu_fwd(gate, up, config=masked_cfg)
        assert torch.equal(even, masked)
        torch.testing.assert_close(even, S.swiglu_ref(gate, up))
        for a, b in zip(S.swiglu_bwd(dy, gate, up, config=even_cfg),
                        S.swiglu_bwd(dy, gate, up, config=masked_cfg)):
            assert torch.equal(a, b)


def test_64bit_offsets_branch_and_predicate():
    assert S._needs_64bit(2**20, 4096, 4096)
    assert not S._needs_64bit(1024, 4096, 8192)
    gate, up = torch.randn(5, 24), torch.randn(5, 24)
    y = torch.empty_like(gate)
    S.launch(S._swiglu_fwd_kernel, (3,), gate.device, gate, up, y, 5, 24, 1, 24, 24, 24,
             BLOCK_M=2, BLOCK_N=32, EVEN=False, OFFSETS_64=True, num_warps=1)
    torch.testing.assert_close(y, S.swiglu_ref(gate, up))


def test_float64_takes_recorded_torch_path():
    g = torch.Generator().manual_seed(13)
    gate = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    y = aiter_dist.swiglu(gate, up)
    assert aiter_dist.last_path("swiglu") == "torch" and y.dtype == torch.float64
    torch.testing.assert_close(y, S.swiglu_ref(gate, up), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(aiter_dist.swiglu, (gate, up))
    assert aiter_dist.last_path("swiglu_bwd") == "torch"


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)], ids=str)
def test_zero_size(shape):
    gate = torch.randn(shape, requires_grad=True)
    up = torch.randn(shape, requires_grad=True)
    y = aiter_dist.swiglu(gate, up)
    assert y.shape == shape and aiter_dist.last_path("swiglu") == "torch"
    y.sum().backward()
    assert gate.grad.shape == up.grad.shape == shape


def test_bad_input():
    with pytest.raises(ValueError, match=r"swiglu: gate shape \(4, 8\) differs from up shape "
                                         r"\(4, 9\)"):
        aiter_dist.swiglu(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(TypeError, match="swiglu: gate dtype torch.float32 differs from up dtype "
                                        "torch.float16; cast one"):
        aiter_dist.swiglu(torch.randn(4, 8), torch.randn(4, 8).half())
    with pytest.raises(TypeError, match="swiglu: up has dtype torch.int64"):
        aiter_dist.swiglu(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="swiglu: gate must be a torch.Tensor"):
        aiter_dist.swiglu([1.0], torch.randn(1))
    with pytest.raises(ValueError, match="swiglu: up is on meta but gate is on cpu"):
        aiter_dist.swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta"))


def test_config():
    cuda = torch.device("cuda")
    bm, bn, warps = S.swiglu_config(1, 10**6, cuda)
    assert bm == 1 and bn == S.GPU_TILE_ELEMENTS
    bm, bn, _ = S.swiglu_config(4096, 11008, cuda)
    assert bn == S.GPU_MAX_BLOCK_N and bm * bn <= max(S.GPU_TILE_ELEMENTS, bn)
    assert S.swiglu_config(1, 37, cuda)[1] == 64  # a small flat problem: one padded block


# ----------------------------------------------------------------------------- torch.compile

def test_compile_matches_eager():
    g = torch.Generator().manual_seed(17)

    def fn(gu):
        gate, up = gu.chunk(2, -1)
        return aiter_dist.swiglu(gate * 2, up).sin()

    assert_compiled_matches_eager(fn, (torch.randn(3, 5, 26, generator=g),), atol=1e-6)
    assert_compiled_matches_eager(aiter_dist.swiglu, (torch.randn(7, 13, generator=g),
                                                      torch.randn(7, 13, generator=g)), atol=1e-6)


def test_opcheck():
    g = torch.Generator().manual_seed(19)
    gate, up, dy = (torch.randn(5, 13, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.aiter_dist.swiglu_fwd.default, (gate, up),
                          test_utils=OPCHECK)
    torch.library.opcheck(torch.ops.aiter_dist.swiglu_bwd.default, (dy, gate, up),
                          test_utils=OPCHECK)
    gu = torch.randn(2, 5, 26, generator=g)
    a, b = gu.chunk(2, -1)  # strided views: the fakes' contiguous outputs match the real ones
    torch.library.opcheck(torch.ops.aiter_dist.swiglu_fwd.default, (a, b),
                          test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.aiter_dist.swiglu_bwd.default,
                          (torch.randn(2, 5, 13, generator=g), a, b),
                          test_utils=("test_faketensor",))


# ----------------------------------------------------------------------------- GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_swiglu_gpu_real_size(layout):
    torch.manual_seed(0)
    tokens, n = 8192, 11008
    if layout == "contiguous":
        gate = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        leaves = (gate, up)
    else:
        gu = torch.randn(tokens, 2 * n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gate, up = gu.chunk(2, -1)
        leaves = (gate, up)
    y = aiter_dist.swiglu(gate, up)
    assert aiter_dist.last_path("swiglu") == "triton"
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, leaves, dy)
    g64, u64 = gate.detach().double(), up.detach().double()
    s = torch.sigmoid(g64)
    assert_close_to_ref("gpu y", y, g64 * s * u64, S.swiglu_ref(gate.detach(), up.detach()))
    low = S._swiglu_bwd_torch(dy, gate.detach(), up.detach())
    d64 = dy.double()
    assert_close_to_ref("gpu dgate", dgate, d64 * u64 * s * (1 + g64 * (1 - s)), low[0])
    assert_close_to_ref("gpu dup", dup, d64 * g64 * s, low[1])
    # A second call of the same signature (the cached launch) on other data.
    g2, u2 = torch.randn_like(gate), torch.randn_like(up)
    torch.testing.assert_close(aiter_dist.swiglu(g2, u2), S.swiglu_ref(g2, u2))


@pytest.mark.gpu
def test_swiglu_cpu_tensor_on_gpu_host_takes_recorded_torch_path():
    gate, up = torch.randn(3, 7), torch.randn(3, 7)
    y = aiter_dist.swiglu(gate, up)
    assert aiter_dist.last_path("swiglu") == "torch"
    torch.testing.assert_close(y, S.swiglu_ref(gate, up))
    torch.testing.assert_close(aiter_dist.swiglu(gate.cuda(), up.cuda()).cpu(), y)
    assert aiter_dist.last_path("swiglu") == "triton"
