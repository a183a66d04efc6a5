"""RoPE (apply_rotary_emb, apply_rotary_emb_qk): outputs and gradients against a float64
reference, in place, strided views, varlen, offsets, bad input, torch.compile and opcheck."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels import rope as R
from aiter_dist.testing import OPCHECK, assert_close_to_ref, assert_compiled_matches_eager

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(seqlen_ro, rotary_dim, dtype=torch.float32, device="cpu", base=100.0):
    """Real RoPE tables: angle p * base^(-2i/rd) for position p and pair i."""
    inv = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _compare(fn_ours, x, cos, sin, g, ref_kwargs, name):
    """Ours vs the float64 reference vs PyTorch in x's dtype: output and dx."""
    xs = x.detach().clone().requires_grad_()
    out = fn_ours(xs)
    out.backward(g)
    results = []
    for cast in (lambda t: t.double(), lambda t: t):
        xr = cast(x.detach()).requires_grad_()
        o = R.apply_rotary_emb_ref(xr, cast(cos), cast(sin), **ref_kwargs)
        o.backward(cast(g))
        results.append((o, xr.grad))
    (ref, dref), (low, dlow) = results
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    assert_close_to_ref(f"{name} out", out, ref, low)
    assert_close_to_ref(f"{name} dx", xs.grad, dref, dlow)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("headdim,rotary_dim", [(16, 16), (16, 8), (24, 24), (24, 16), (24, 8)],
                         ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_rope_dense(dtype, headdim, rotary_dim, interleaved, offsets):
    g = _gen(headdim * 7 + rotary_dim + 3 * interleaved)
    b, s, h = 2, 7, 3
    x = torch.randn(b, s, h, headdim, generator=g).to(dtype)
    dy = torch.randn(b, s, h, headdim, generator=g).to(dtype)
    cos, sin = _tables(13, rotary_dim)
    off = {"zero": 0, "int": 4, "tensor": torch.tensor([6, 1])}[offsets]
    _compare(lambda t: aiter_dist.apply_rotary_emb(t, cos, sin, interleaved, seqlen_offsets=off),
             x, cos, sin, dy, dict(interleaved=interleaved, seqlen_offsets=off),
             f"{dtype} hd{headdim} rd{rotary_dim} {interleaved} {offsets}")
    assert aiter_dist.last_path("apply_rotary_emb") == "triton-interpreter"
    assert aiter_dist.last_path("apply_rotary_emb_bwd") == "triton-interpreter"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_rope_varlen(dtype, interleaved, offsets):
    """Packed sequences of lengths 3, 0, 5, 1 (one empty): positions restart in each."""
    g = _gen(11 + interleaved)
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    x = torch.randn(9, 3, 24, generator=g).to(dtype)
    dy = torch.randn(9, 3, 24, generator=g).to(dtype)
    cos, sin = _tables(11, 16)
    off = 2 if offsets == "int" else torch.tensor([0, 9, 6, 10], dtype=torch.int32)
    _compare(lambda t: aiter_dist.apply_rotary_emb(t, cos, sin, interleaved, seqlen_offsets=off,
                                                   cu_seqlens=cu, max_seqlen=5),
             x, cos, sin, dy, dict(interleaved=interleaved, seqlen_offsets=off, cu_seqlens=cu),
             f"varlen {dtype} {interleaved} {offsets}")
    # Sequence by sequence, the packed call equals dense calls on each sequence alone.
    out = aiter_dist.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=off,
                                      cu_seqlens=cu, max_seqlen=5)
    for i in range(4):
        a, e = cu[i].item(), cu[i + 1].item()
        o = off if isinstance(off, int) else off[i].item()
        dense = aiter_dist.apply_rotary_emb(x[None, a:e], cos, sin, interleaved, seqlen_offsets=o)
        assert torch.equal(out[a:e], dense[0])


def test_reference_is_a_complex_rotation():
    """The reference itself, against the textbook form: interleaved pairs as complex numbers
    times e^(i*angle); non-interleaved halves likewise after moving them into pairs."""
    g = _gen(3)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)
    cos, sin = _tables(5, 8, torch.float64)
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None, :]
    pairs = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2).contiguous())
    expect = torch.view_as_real(pairs * rot).reshape(x.shape)
    torch.testing.assert_close(R.apply_rotary_emb_ref(x, cos, sin, interleaved=True), expect)
    halves = torch.complex(x[..., :4], x[..., 4:]) * rot
    torch.testing.assert_close(R.apply_rotary_emb_ref(x, cos, sin),
                               torch.cat([halves.real, halves.imag], -1))


def test_fp32_tables_with_half_input_and_half_tables_with_fp32_input():
    g = _gen(5)
    x = torch.randn(1, 5, 2, 16, generator=g)
    cos, sin = _tables(5, 16)
    for xd, td in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16)):
        out = aiter_dist.apply_rotary_emb(x.to(xd), cos.to(td), sin.to(td))
        assert out.dtype == xd
        ref = R.apply_rotary_emb_ref(x.to(xd).double(), cos.to(td).double(), sin.to(td).double())
        low = R.apply_rotary_emb_ref(x.to(xd), cos.to(td), sin.to(td))
        assert_close_to_ref(f"{xd} x {td} tables", out, ref, low)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_inplace(interleaved, varlen):
    """Returns x itself, rotates its first rotary_dim features, leaves the tail's bits alone,
    and the gradient reaches the tensor x was made from."""
    g = _gen(17)
    shape = (9, 3, 24) if varlen else (2, 7, 3, 24)
    kw = dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen=5) if varlen \
        else {}
    leaf = torch.randn(shape, generator=g, requires_grad=True)
    dy = torch.randn(shape, generator=g)
    cos, sin = _tables(10, 16)
    off = torch.tensor([1, 3])
    expected = aiter_dist.apply_rotary_emb(leaf.detach(), cos, sin, interleaved,
                                           seqlen_offsets=off, **kw)
    x = leaf.clone()
    tail = x[..., 16:].clone()
    ptr = x.data_ptr()
    out = aiter_dist.apply_rotary_emb(x, cos, sin, interleaved, inplace=True, seqlen_offsets=off,
                                      **kw)
    assert out is x and x.data_ptr() == ptr
    assert torch.equal(x[..., 16:], tail)
    assert torch.equal(x, expected)
    out.backward(dy)
    ref_leaf = leaf.detach().double().requires_grad_()
    R.apply_rotary_emb_ref(ref_leaf, cos.double(), sin.double(), interleaved, off,
                           kw.get("cu_seqlens")).backward(dy.double())
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-5)
    # Without autograd too, and the tail's bits stay even when they are NaN (never written).
    y = torch.randn(shape, generator=g)
    y[..., 20] = float("nan")
    r = aiter_dist.apply_rotary_emb(y, cos, sin, interleaved, inplace=True, **kw)
    assert r is y and torch.isnan(y[..., 20]).all() and torch.isfinite(y[..., :16]).all()


def _projection_views(b, s, hq, hk, d, dtype, g):
    """q, k, v as views of one fused projection output (b, s, (hq + 2 hk) * d): the row stride
    of q and k is (hq + 2 hk) * d, not h * d."""
    qkv = torch.randn(b, s, (hq + 2 * hk) * d, generator=g).to(dtype)
    q = qkv[..., :hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d:(hq + hk) * d].view(b, s, hk, d)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_qk_fused_matches_separate_calls_on_strided_views(dtype, interleaved):
    g = _gen(23)
    qkv, q, k = _projection_views(2, 7, 5, 2, 24, dtype, g)
    assert not q.is_contiguous() and q.stride(1) == 9 * 24
    cos, sin = _tables(10, 16)
    off = torch.tensor([3, 0])
    dq = torch.randn(q.shape, generator=g).to(dtype)
    dk = torch.randn(k.shape, generator=g).to(dtype)

    qs, ks = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    sep = (aiter_dist.apply_rotary_emb(qs, cos, sin, interleaved, seqlen_offsets=off),
           aiter_dist.apply_rotary_emb(ks, cos, sin, interleaved, seqlen_offsets=off))
    torch.autograd.backward(sep, (dq, dk))
    qv, kv = q.detach().requires_grad_(), k.detach().requires_grad_()  # the strided views
    fused = aiter_dist.apply_rotary_emb_qk(qv, kv, cos, sin, interleaved, seqlen_offsets=off)
    assert aiter_dist.last_path("apply_rotary_emb_qk") == "triton-interpreter"
    torch.autograd.backward(fused, (dq, dk))
    for a, b_ in zip(fused + (qv.grad, kv.grad), sep + (qs.grad, ks.grad)):
        assert torch.equal(a, b_)
    assert fused[0].is_contiguous() and fused[1].is_contiguous()
    ref = R.apply_rotary_emb_ref(q.double(), cos.double(), sin.double(), interleaved, off)
    assert_close_to_ref("q on a strided view", fused[0], ref,
                        R.apply_rotary_emb_ref(q, cos, sin, interleaved, off))
    # The strided single-tensor call reads the view where it is: equal to a contiguous copy's.
    assert torch.equal(aiter_dist.apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=off),
                       aiter_dist.apply_rotary_emb(q.contiguous(), cos, sin, interleaved,
                                                   seqlen_offsets=off))


def test_qk_inplace_on_projection_views_and_one_unused_output():
    """In place on views: the projection buffer itself changes (no copy was rotated), v's
    columns stay; a backward through k alone gives q no gradient and k the right one."""
    g = _gen(29)
    qkv, q, k = _projection_views(2, 5, 4, 2, 16, torch.float32, g)
    before = qkv.clone()
    cos, sin = _tables(5, 16)
    q_ref = aiter_dist.apply_rotary_emb(q, cos, sin)
    k_ref = aiter_dist.apply_rotary_emb(k, cos, sin)
    qo, ko = aiter_dist.apply_rotary_emb_qk(q, k, cos, sin, inplace=True)
    assert qo is q and ko is k
    assert torch.equal(qkv[..., :64].view(q.shape), q_ref)
    assert torch.equal(qkv[..., 64:96].view(k.shape), k_ref)
    assert torch.equal(qkv[..., 96:], before[..., 96:])

    q2 = torch.randn(2, 5, 4, 16, generator=g, requires_grad=True)
    k2 = torch.randn(2, 5, 2, 16, generator=g, requires_grad=True)
    _, ko = aiter_dist.apply_rotary_emb_qk(q2, k2, cos, sin)
    dk = torch.randn(ko.shape, generator=g)
    ko.backward(dk)
    assert q2.grad is None
    k64 = k2.detach().double().requires_grad_()
    R.apply_rotary_emb_ref(k64, cos.double(), sin.double()).backward(dk.double())
    torch.testing.assert_close(k2.grad.double(), k64.grad, rtol=1e-5, atol=1e-5)


def test_qk_varlen_gqa():
    g = _gen(31)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    q = torch.randn(7, 6, 16, generator=g, dtype=torch.bfloat16)
    k = torch.randn(7, 1, 16, generator=g, dtype=torch.bfloat16)
    cos, sin = _tables(9, 8)
    off = torch.tensor([4, 1])
    qo, ko = aiter_dist.apply_rotary_emb_qk(q, k, cos, sin, True, seqlen_offsets=off,
                                            cu_seqlens=cu, max_seqlen=5)
    assert torch.equal(qo, aiter_dist.apply_rotary_emb(q, cos, sin, True, seqlen_offsets=off,
                                                       cu_seqlens=cu, max_seqlen=5))
    ref = R.apply_rotary_emb_ref(k.double(), cos.double(), sin.double(), True, off, cu)
    assert_close_to_ref("k varlen", ko, ref, R.apply_rotary_emb_ref(k, cos, sin, True, off, cu))


def test_backward_of_expanded_gradient():
    """``out.sum().backward()`` hands the backward a stride-0 gradient: read correctly."""
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    cos, sin = _tables(3, 8)
    aiter_dist.apply_rotary_emb(x, cos, sin).sum().backward()
    x64 = x.detach().double().requires_grad_()
    R.apply_rotary_emb_ref(x64, cos.double(), sin.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)


def test_tables_get_no_gradient():
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _tables(3, 8))
    aiter_dist.apply_rotary_emb(x, cos, sin).sum().backward()
    assert x.grad is not None and cos.grad is None and sin.grad is None


def test_float64_takes_recorded_torch_path():
    g = _gen(37)
    x = torch.randn(2, 4, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(6, 8, torch.float64)
    off = torch.tensor([2, 0])
    out = aiter_dist.apply_rotary_emb(x, cos, sin, True, seqlen_offsets=off)
    assert aiter_dist.last_path("apply_rotary_emb") == "torch" and out.dtype == torch.float64
    torch.testing.assert_close(out, R.apply_rotary_emb_ref(x, cos, sin, True, off),
                               rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda t: aiter_dist.apply_rotary_emb(t, cos, sin, True, seqlen_offsets=off), (x,))
    assert aiter_dist.last_path("apply_rotary_emb_bwd") == "torch"
    q, k = x.detach().clone(), x.detach()[:, :, :1].clone()
    qo, ko = aiter_dist.apply_rotary_emb_qk(q, k, cos, sin, inplace=True)
    assert qo is q and aiter_dist.last_path("apply_rotary_emb_qk") == "torch"
    torch.testing.assert_close(q, R.apply_rotary_emb_ref(x.detach(), cos, sin))


def test_zero_size_inputs():
    cos, sin = _tables(4, 8)
    for shape in ((0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)):
        x = torch.randn(shape, requires_grad=True)
        out = aiter_dist.apply_rotary_emb(x, cos, sin)
        assert out.shape == shape and aiter_dist.last_path("apply_rotary_emb") == "torch"
        out.sum().backward()
        assert x.grad.shape == shape
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    out = aiter_dist.apply_rotary_emb(torch.randn(0, 2, 8), cos, sin, cu_seqlens=cu,
                                      max_seqlen=0)
    assert out.shape == (0, 2, 8)


def test_positions_outside_the_tables_are_rejected_on_cpu():
    cos, sin = _tables(8, 8)
    x = torch.randn(2, 5, 2, 8)
    aiter_dist.apply_rotary_emb(x, cos, sin, seqlen_offsets=3)  # positions 3..7: fine
    with pytest.raises(ValueError, match=r"apply_rotary_emb: positions up to 5 \+ seqlen_offsets"
                                         r" 4 - 1 must lie in the cos/sin tables' 8 rows"):
        aiter_dist.apply_rotary_emb(x, cos, sin, seqlen_offsets=4)
    with pytest.raises(ValueError, match="put a token at position 8, outside the cos/sin "
                                         "tables' rows 0..7"):
        aiter_dist.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="position -1"):
        aiter_dist.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([-1, 0]))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    xv = torch.randn(6, 2, 8)
    # Sequence 1 has 4 tokens: offset 4 reaches 7 (fine), offset 5 reaches 8; an empty
    # sequence's offset does not matter.
    aiter_dist.apply_rotary_emb(xv, cos, sin, seqlen_offsets=torch.tensor([6, 4]),
                                cu_seqlens=cu, max_seqlen=4)
    with pytest.raises(ValueError, match="position 8"):
        aiter_dist.apply_rotary_emb(xv, cos, sin, seqlen_offsets=torch.tensor([0, 5]),
                                    cu_seqlens=cu, max_seqlen=4)
    aiter_dist.apply_rotary_emb(torch.randn(2, 2, 8), cos, sin, seqlen_offsets=torch.tensor(
        [100, 0], dtype=torch.int32), cu_seqlens=torch.tensor([0, 0, 2], dtype=torch.int32),
        max_seqlen=2)


def test_kernel_leaves_unchecked_off_table_positions_unrotated():
    """What an unchecked call (GPU, dense, tensor offsets) does with a position past the tables:
    reads nothing there and passes the token through. Driven at the launcher, below the
    checks."""
    cos, sin = _tables(6, 8)
    x = torch.randn(2, 4, 2, 8)
    off = torch.tensor([0, 4])  # sequence 1: positions 4, 5 in the tables, 6, 7 off them
    out, _ = R._rotary("apply_rotary_emb", x, None, cos, sin, False, False, off, None, None,
                       True)  # conjugate: the value checks are skipped
    torch.testing.assert_close(out[1, 2:], x[1, 2:], rtol=0, atol=0)
    torch.testing.assert_close(out[1, :2], R.apply_rotary_emb_ref(
        x[1:, :2], cos, -sin, seqlen_offsets=4)[0])


def test_bad_input():
    x = torch.randn(2, 5, 3, 16)
    cos, sin = _tables(8, 16)
    f = aiter_dist.apply_rotary_emb
    with pytest.raises(ValueError, match=r"apply_rotary_emb: x must be \(batch, seqlen, nheads, "
                                         r"headdim\), got shape \(5, 3, 16\); pass cu_seqlens"):
        f(x[0], cos, sin)
    with pytest.raises(ValueError, match="x must be .total_seqlen, nheads, headdim. with "
                                         "cu_seqlens"):
        f(x, cos, sin, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), max_seqlen=5)
    with pytest.raises(ValueError, match="rotary_dim = 2 . cos.shape.-1. = 24 exceeds headdim 16"):
        f(x, *_tables(8, 24))
    with pytest.raises(ValueError, match="cos and sin must both be .seqlen_ro, rotary_dim / 2."):
        f(x, cos, sin[:, :4])
    with pytest.raises(ValueError, match="cos and sin must both be"):
        f(x, cos[None], sin[None])
    with pytest.raises(ValueError, match="apply_rotary_emb: cu_seqlens needs max_seqlen"):
        f(x[0], cos, sin, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32 tensor"):
        f(x[0], cos, sin, cu_seqlens=torch.tensor([0, 2, 5]), max_seqlen=3)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] is 4 but x has 5 rows"):
        f(x[0], cos, sin, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(ValueError, match="sequence 1 has 3 rows .* but max_seqlen is 2"):
        f(x[0], cos, sin, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen=2)
    with pytest.raises(TypeError, match="apply_rotary_emb: x has dtype torch.int64"):
        f(x.long(), cos, sin)
    with pytest.raises(TypeError, match="cos has dtype torch.int32"):
        f(x, cos.int(), sin)
    with pytest.raises(ValueError, match="sin is on meta but x is on cpu; move them to one"):
        f(x, cos, sin.to("meta"))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        f(x.transpose(2, 3), cos, sin)
    with pytest.raises(ValueError, match=r"seqlen_offsets must be int32 or int64 of shape \(2,\)"):
        f(x, cos, sin, seqlen_offsets=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="seqlen_offsets must be an int or a"):
        f(x, cos, sin, seqlen_offsets=1.5)
    with pytest.raises(ValueError, match="seqlen_offsets -1"):
        f(x, cos, sin, seqlen_offsets=-1)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 6, 2, 16)
    with pytest.raises(ValueError, match="apply_rotary_emb_qk: k .2, 6, 2, 16. and q .2, 5, 4, "
                                         "16. must share every dimension but the head count"):
        aiter_dist.apply_rotary_emb_qk(q, k, cos, sin)
    with pytest.raises(TypeError, match="apply_rotary_emb_qk: k dtype torch.float16 differs"):
        aiter_dist.apply_rotary_emb_qk(q, k[:, :5].half(), cos, sin)


def test_config_and_wide_offsets():
    """The GPU config takes heads first and keeps its tile near GPU_TILE_ELEMENTS; the 64-bit
    tile offsets branch (huge strides) computes the same values on a small tensor."""
    cuda = torch.device("cuda")
    for h, hk, d in ((32, 8, 128), (32, 0, 64), (8, 1, 256), (64, 64, 128), (1, 0, 32)):
        bt, bh, bhk, warps = R.rope_config(h, hk, d // 2, d, False, cuda)
        tile = bt * max(bh, bhk) * d
        assert bh <= R.GPU_MAX_BLOCK_H and max(bh, bhk) * d <= max(R.GPU_MAX_TILE, d)
        assert tile <= max(R.GPU_TILE_ELEMENTS, max(bh, bhk) * d) and warps >= 1
        assert bh >= min(h, R.GPU_MAX_BLOCK_H, R.GPU_MAX_TILE // d)  # heads first

    def offsets_64(x):
        cos = torch.empty(8, 4, device="meta")
        plan = R._plan("test", x, None, cos, cos, False, False, False, None, False, None, 0, None)
        R._plans.pop("test")
        return plan[2]["OFFSETS_64"]
    assert offsets_64(torch.empty_strided((2, 4, 8, 128), (0, 2**30, 128, 1), device="meta"))
    assert not offsets_64(torch.empty(2, 4, 8, 128, device="meta"))
    x = torch.randn(2, 5, 3, 16)
    cos, sin = _tables(5, 8)
    out = torch.empty_like(x)
    R.launch(R._rotary_kernel, (2 * 1, 1), x.device, x, out, x, out, cos, sin, cos, cos,
             0, 5, 5, 1, 3, 0, 1, *x.stride()[:3], *out.stride()[:3], *x.stride()[:3],
             *out.stride()[:3], cos.stride(0), sin.stride(0), ROT_HALF=4, HEADDIM=16,
             BLOCK_T=8, BLOCK_H=4, BLOCK_HK=4, BLOCK_K=4, BLOCK_TAIL=8, INTERLEAVED=False,
             CONJUGATE=False, VARLEN=False, OFFSETS_TENSOR=False, HAS_K=False, COPY_TAIL=True,
             OFFSETS_64=True, num_warps=1)
    torch.testing.assert_close(out, R.apply_rotary_emb_ref(x, cos, sin))


# ----------------------------------------------------------------------------- torch.compile

_compile_compare = assert_compiled_matches_eager


def test_compile_matches_eager():
    g = _gen(41)
    x = torch.randn(2, 5, 3, 16, generator=g)
    k = torch.randn(2, 5, 1, 16, generator=g)
    cos, sin = _tables(9, 8)
    off = torch.tensor([1, 4])
    _compile_compare(lambda x: aiter_dist.apply_rotary_emb(x * 2, cos, sin, True,
                                                           seqlen_offsets=off).sin(), (x,))
    _compile_compare(lambda x: aiter_dist.apply_rotary_emb(x, cos, sin, seqlen_offsets=3), (x,))
    _compile_compare(lambda q, k: sum(t.sum((-1, -2)) for t in aiter_dist.apply_rotary_emb_qk(
        q, k, cos, sin, seqlen_offsets=off)), (x, k))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    _compile_compare(lambda x: aiter_dist.apply_rotary_emb(x, cos, sin, cu_seqlens=cu,
                                                           max_seqlen=7).cos(),
                     (x.reshape(10, 3, 16),))
    # In place under compile: the out-of-place op, copied back into x.
    _compile_compare(lambda x: aiter_dist.apply_rotary_emb(x * 1, cos, sin, inplace=True), (x,))


def test_opcheck():
    g = _gen(43)
    x = torch.randn(2, 5, 3, 16, generator=g)
    k = torch.randn(2, 5, 2, 16, generator=g)
    cos, sin = _tables(9, 8)
    off = torch.tensor([1, 4])
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    for conj in (False, True):
        torch.library.opcheck(torch.ops.aiter_dist.rotary_emb.default,
                              (x, cos, sin, off, 0, None, 0, True, conj), test_utils=OPCHECK)
        torch.library.opcheck(torch.ops.aiter_dist.rotary_emb.default,
                              (x.reshape(10, 3, 16), cos, sin, None, 2, cu, 7, False, conj),
                              test_utils=OPCHECK)
        torch.library.opcheck(torch.ops.aiter_dist.rotary_emb_qk.default,
                              (x, k, cos, sin, None, 3, None, 0, False, conj), test_utils=OPCHECK)
    # A strided (non-contiguous) input: the fake's contiguous output matches the real one's.
    qkv = torch.randn(2, 5, 7 * 16, generator=g)
    torch.library.opcheck(torch.ops.aiter_dist.rotary_emb_qk.default,
                          (qkv[..., :48].view(2, 5, 3, 16), qkv[..., 48:80].view(2, 5, 2, 16),
                           cos, sin, off, 0, None, 0, True, False), test_utils=("test_faketensor",))


# ----------------------------------------------------------------------------- GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rope_gpu_real_size(interleaved):
    torch.manual_seed(0)
    b, s, h, d = 8, 2048, 32, 128
    x = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = _tables(s + 64, d, device="cuda", base=10000.0)
    off = torch.randint(0, 64, (b,), device="cuda")
    out = aiter_dist.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=off)
    assert aiter_dist.last_path("apply_rotary_emb") == "triton"
    dy = torch.randn_like(out)
    out.backward(dy)
    ref = R.apply_rotary_emb_ref(x.detach().double(), cos.double(), sin.double(), interleaved, off)
    low = R.apply_rotary_emb_ref(x.detach(), cos, sin, interleaved, off)
    assert_close_to_ref("gpu out", out, ref, low)
    dref = R.apply_rotary_emb_ref(dy.double(), cos.double(), -sin.double(), interleaved, off)
    assert_close_to_ref("gpu dx", x.grad, dref,
                        R.apply_rotary_emb_ref(dy, cos, -sin, interleaved, off))
    # GQA q/k as views of one projection, fused; partial rotary_dim; varlen.
    qkv = torch.randn(4, 1000, (32 + 16) * 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[..., :4096].view(4, 1000, 32, 128), qkv[..., 4096:5120].view(4, 1000, 8, 128)
    c2, s2 = _tables(1000, 64, device="cuda")
    qo, ko = aiter_dist.apply_rotary_emb_qk(q, k, c2, s2, interleaved)
    assert torch.equal(qo, aiter_dist.apply_rotary_emb(q, c2, s2, interleaved))
    assert torch.equal(ko, aiter_dist.apply_rotary_emb(k, c2, s2, interleaved))
    assert_close_to_ref("gpu k", ko, R.apply_rotary_emb_ref(k.double(), c2.double(), s2.double(),
                                                            interleaved),
                        R.apply_rotary_emb_ref(k, c2, s2, interleaved))
    qkv.normal_()  # the same signatures again (cached launches) on new data
    qo2, ko2 = aiter_dist.apply_rotary_emb_qk(q, k, c2, s2, interleaved)
    assert torch.equal(qo2, aiter_dist.apply_rotary_emb(q.contiguous(), c2, s2, interleaved))
    assert torch.equal(ko2, aiter_dist.apply_rotary_emb(k.contiguous(), c2, s2, interleaved))
    cu = torch.tensor([0, 1, 700, 700, 1700], dtype=torch.int32, device="cuda")
    xv = q.reshape(4000, 32, 128)[:1700]  # still a strided view of the projection
    ov = aiter_dist.apply_rotary_emb(xv, c2, s2, interleaved, cu_seqlens=cu, max_seqlen=1000)
    seq3 = xv[None, 700:1700]
    assert_close_to_ref("gpu varlen", ov[None, 700:1700],
                        R.apply_rotary_emb_ref(seq3.double(), c2.double(), s2.double(),
                                               interleaved),
                        R.apply_rotary_emb_ref(seq3, c2, s2, interleaved))


@pytest.mark.gpu
def test_rope_cpu_tensor_on_gpu_host_takes_recorded_torch_path():
    x = torch.randn(2, 3, 2, 8)
    cos, sin = _tables(3, 8)
    out = aiter_dist.apply_rotary_emb(x, cos, sin)
    assert aiter_dist.last_path("apply_rotary_emb") == "torch"
    torch.testing.assert_close(out, R.apply_rotary_emb_ref(x, cos, sin))
    gpu = aiter_dist.apply_rotary_emb(x.cuda(), cos.cuda(), sin.cuda())
    torch.testing.assert_close(gpu.cpu(), out)
    assert aiter_dist.last_path("apply_rotary_emb") == "triton"

