"""Flash attention forward and gradients against a float64 reference (the tolerance rule: at most
a small multiple of PyTorch's own error in the same dtype)."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels.flash_attn import attention_ref
from aiter_dist.testing import assert_close_to_ref


def _inputs(b, sq, sk, h, hk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d), mk(b, sq, h, d)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _check_against_ref(b, sq, sk, h, hk, d, causal, window, dtype, device, factor=2.0,
                       deterministic=False):
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, dtype, device)
    ours = _grads(lambda q, k, v: aiter_dist.flash_attn_func(
        q, k, v, causal=causal, window_size=window, deterministic=deterministic), q, k, v, do)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                 *(t.double() for t in (q, k, v, do)))
    low = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0], q, k, v, do)
    for name, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, low):
        assert_close_to_ref(f"{name} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal} "
                            f"window={window}", o, r, t, factor=factor)


CPU_CASES = [
    # b, sq, sk, h, hk, d, causal, window
    (1, 1, 1, 1, 1, 16, False, (-1, -1)),
    (2, 17, 17, 4, 2, 64, True, (-1, -1)),
    (1, 113, 113, 2, 2, 32, True, (-1, -1)),
    (2, 17, 40, 2, 1, 16, True, (-1, -1)),    # sq < sk, MQA
    (2, 40, 23, 2, 2, 16, True, (-1, -1)),    # sq > sk: the first rows see no key
    (1, 45, 45, 4, 2, 24, False, (7, 3)),     # sliding window, head dim padded to 32
    (1, 33, 50, 2, 2, 16, False, (5, -1)),    # left window only
    (1, 30, 30, 2, 2, 40, False, (-1, -1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_cpu(case, dtype):
    _check_against_ref(*case, dtype=dtype, device="cpu")
    assert aiter_dist.last_path("flash_attn").startswith("triton")


SMALL_BLOCK_CASES = [
    # b, sq, sk, h, hk, d, causal, window: many blocks, so interior blocks take the unmasked path
    (1, 64, 64, 2, 1, 16, True, (-1, -1)),
    (1, 70, 70, 2, 2, 24, True, (-1, -1)),     # partial last blocks, head dim padded
    (1, 37, 90, 2, 1, 16, True, (-1, -1)),     # sq < sk
    (1, 90, 37, 2, 2, 16, True, (-1, -1)),     # sq > sk
    (1, 80, 80, 2, 2, 16, False, (-1, -1)),
    (1, 77, 77, 2, 2, 16, False, (20, 9)),     # sliding window
    (1, 64, 96, 2, 2, 16, False, (33, -1)),    # left window only
]


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32), ((16, 32), (32, 16))], ids=str)
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_small_blocks_unmasked_and_boundary_tiles(case, blocks):
    """Both backwards: the one kernel (dQ by atomics) and the deterministic pair (a config per
    kernel picks it too)."""
    from aiter_dist.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

    b, sq, sk, h, hk, d, causal, window = case
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.float32, "cpu", seed=sq + sk)
    if isinstance(blocks[0], int):
        fwd_config = bwd_config = (*blocks, 1, 1)
    else:  # the backward's two kernels with blocks of their own
        fwd_config, bwd_config = (*blocks[0], 1, 1), tuple((*b, 1, 1) for b in blocks)
    scale = d ** -0.5
    out, lse = flash_attn_fwd(q, k, v, scale, causal, window, config=fwd_config)
    deterministic = (sq + len(blocks)) % 2 == 1
    dq, dk, dv = flash_attn_bwd(do, q, k, v, out, lse, scale, causal, window, config=bwd_config,
                                deterministic=deterministic)
    two_kernels = deterministic or not isinstance(blocks[0], int)  # a pair picks two kernels
    assert aiter_dist.last_path("flash_attn_bwd") == (
        "triton-interpreter-deterministic" if two_kernels else "triton-interpreter-atomic-dq")
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                 *(t.double() for t in (q, k, v, do)))
    _, ref_lse = attention_ref(q.double(), k.double(), v.double(), None, causal, window)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=name)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(lse), ~finite)


@pytest.mark.parametrize("case", [(2, 70, 70, 4, 2, 32, True, (-1, -1)),
                                  (1, 37, 90, 2, 1, 16, True, (-1, -1)),
                                  (1, 64, 64, 2, 2, 16, False, (20, 9))],
                         ids=lambda c: "-".join(map(str, c)))
def test_forward_with_tensor_descriptors(case):
    """The opt-in TMA paths (tiles through tensor descriptors) against float64."""
    from aiter_dist.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

    b, sq, sk, h, hk, d, causal, window = case
    q, k, v, _ = _inputs(b, sq, sk, h, hk, d, torch.float32, "cpu", seed=5)
    out, lse = flash_attn_fwd(q, k, v, d ** -0.5, causal, window, config=(16, 16, 1, 1, True))
    assert aiter_dist.last_path("flash_attn") == "triton-interpreter-tma"
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), None, causal, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    do = torch.randn_like(q)
    ref_grads = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                       *(t.double() for t in (q, k, v, do)))[1:]
    for deterministic, config in ((True, ((16, 32, 1, 1, True), (32, 16, 1, 1, True))),
                                  (False, (16, 32, 1, 1, True))):
        grads = flash_attn_bwd(do, q, k, v, out, lse, d ** -0.5, causal, window, config=config,
                               deterministic=deterministic)
        assert aiter_dist.last_path("flash_attn_bwd").endswith("-tma")
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=name)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    # A head dim that is not a power of 2 keeps the pointer path, visibly.
    q, k, v, _ = _inputs(1, 20, 20, 2, 2, 24, torch.float32, "cpu")
    flash_attn_fwd(q, k, v, 24 ** -0.5, causal, window, config=(16, 16, 1, 1, True))
    assert aiter_dist.last_path("flash_attn") == "triton-interpreter"


def test_lse_and_empty_rows():
    q, k, v, _ = _inputs(1, 9, 4, 2, 2, 16, torch.float32, "cpu")
    out, lse = aiter_dist.flash_attn_func(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), None, True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 9)
    torch.testing.assert_close(lse, ref_lse.float().permute(0, 1, 2), rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[:, :, :5]).all() and (out[:, :5] == 0).all()  # 5 rows see no key


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_that_see_no_key_pass_no_gradient(deterministic):
    """The documented contract: out 0, lse +inf, dq 0 and no NaN anywhere, for causal rows with
    seqlen_q > seqlen_k (bottom-right alignment) and for a varlen sequence with no keys."""
    q, k, v, do = _inputs(1, 9, 4, 2, 2, 16, torch.float32, "cpu")
    _, dq, dk, dv = _grads(lambda q, k, v: aiter_dist.flash_attn_func(
        q, k, v, causal=True, deterministic=deterministic), q, k, v, do)
    assert (dq[:, :5] == 0).all() and (dq[:, 5:] != 0).any()
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 4], dtype=torch.int32)  # sequence 0 has no keys
    qv = q[0, :7].clone().requires_grad_()
    out, lse = aiter_dist.flash_attn_varlen_func(qv, k[0], v[0], cu_q, cu_k, 4, 4,
                                                 deterministic=deterministic, return_lse=True)
    out.backward(do[0, :7])
    assert (out[:3] == 0).all() and torch.isinf(lse[:, :3]).all()
    assert (qv.grad[:3] == 0).all() and torch.isfinite(qv.grad).all()


def test_non_contiguous_inputs():
    base = torch.randn(2, 19, 3, 3, 16)  # k and v interleaved per head: strided views
    k, v = base[..., 1, :], base[..., 2, :]
    q = torch.randn(2, 16, 19, 3).permute(0, 2, 3, 1)  # last dim strided too
    assert not q.is_contiguous() and not k.is_contiguous()
    out = aiter_dist.flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), None, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _check_varlen(lens_q, lens_k, h, hk, d, causal, window, dtype, device, deterministic=False,
                  factor=2.0):
    """The varlen call against attention_ref on each sequence alone: outputs, lse and the three
    gradients, in float64 (and PyTorch's error in ``dtype`` for the tolerance)."""
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    mk = lambda n, heads: torch.randn(n, heads, d, generator=g).to(device, dtype)  # noqa: E731
    q0, k0, v0 = mk(int(cu_q[-1]), h), mk(int(cu_k[-1]), hk), mk(int(cu_k[-1]), hk)
    do = mk(int(cu_q[-1]), h)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out, lse = aiter_dist.flash_attn_varlen_func(
        q, k, v, cu_q.to(device), cu_k.to(device), max(lens_q), max(lens_k), causal=causal,
        window_size=window, deterministic=deterministic, return_lse=True)
    out.backward(do)
    assert lse.shape == (h, q.shape[0])
    for i in range(len(lens_q)):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        name = f"seq {i} ({b - a}x{e - c}) causal={causal} window={window}"
        seq = lambda t, x, y: t[x:y].unsqueeze(0)  # noqa: E731
        ref = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                     *(seq(t, x, y).double() for t, x, y in ((q0, a, b), (k0, c, e),
                                                              (v0, c, e), (do, a, b))))
        low = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                     *(seq(t, x, y) for t, x, y in ((q0, a, b), (k0, c, e), (v0, c, e),
                                                    (do, a, b))))
        ours = (out[a:b], q.grad[a:b], k.grad[c:e], v.grad[c:e])
        for what, o, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, low):
            assert_close_to_ref(f"{what} {name}", o.unsqueeze(0), r, t, factor=factor)
        if b > a and e > c:
            ref_lse = attention_ref(*(seq(t, x, y).double() for t, x, y in (
                (q0, a, b), (k0, c, e), (v0, c, e))), None, causal, window)[1][0]
            finite = torch.isfinite(ref_lse)
            torch.testing.assert_close(lse[:, a:b].double()[finite], ref_lse[finite],
                                       rtol=1e-3, atol=1e-3)


# Mixed lengths with an empty and a length-1 sequence; full, causal and windowed attention.
VARLEN_MODES = [(True, (-1, -1)), (False, (-1, -1)), (False, (6, 2)), (True, (9, 0))]


@pytest.mark.parametrize("causal,window", VARLEN_MODES, ids=str)
def test_varlen_matches_per_sequence_dense(causal, window):
    _check_varlen([5, 0, 1, 17], [7, 3, 1, 17], 4, 2, 16, causal, window, torch.float32, "cpu")


def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 50, 50, 4, 1, 16, torch.float32, "cpu")
    f = lambda q, k, v: aiter_dist.flash_attn_func(q, k, v, causal=True, deterministic=True)  # noqa
    first, second = _grads(f, q, k, v, do), _grads(f, q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_input():
    f, fv = aiter_dist.flash_attn_func, aiter_dist.flash_attn_varlen_func
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="q must be 4-D"):
        f(q[0], q, q)
    with pytest.raises(ValueError, match="nheads=4 must be a multiple of nheads_k=3"):
        f(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))
    with pytest.raises(TypeError, match="dtypes differ"):
        f(q, q.half(), q)
    with pytest.raises(ValueError, match="head dim 12 is not supported"):
        x = torch.randn(1, 4, 4, 12)
        f(x, x, x)
    with pytest.raises(ValueError, match="head dim 264"):
        x = torch.randn(1, 2, 1, 264)
        f(x, x, x)
    with pytest.raises(TypeError, match="bfloat16 is not supported on CPU"):
        f(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with pytest.raises(NotImplementedError, match="dropout_p > 0"):
        f(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        f(q, q, q, window_size=(-2, 0))
    for scale in (0.0, -0.5):
        with pytest.raises(ValueError, match="softmax_scale must be positive"):
            f(q, q, q, softmax_scale=scale)

    qv = torch.randn(6, 4, 16)
    cu = torch.tensor([0, 6])
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        fv(qv, qv, qv, cu, cu.int(), 6, 6)
    with pytest.raises(ValueError, match="q must be 3-D"):
        fv(q, qv, qv, cu.int(), cu.int(), 6, 6)


# ----------------------------------------------------------------------------- GPU tier

GPU_CASES = [
    (2, 1024, 1024, 16, 16, 128, True, (-1, -1)),
    (2, 1024, 1024, 16, 16, 128, False, (-1, -1)),
    (1, 2048, 2048, 32, 8, 128, True, (-1, -1)),
    (2, 777, 1500, 8, 8, 64, True, (-1, -1)),
    (1, 512, 512, 8, 2, 96, True, (128, 0)),
    (1, 512, 512, 4, 4, 256, True, (-1, -1)),
    (2, 1, 1, 4, 4, 64, True, (-1, -1)),       # seqlen 1: ints Triton specializes as constants
    (1, 1, 300, 4, 2, 128, True, (-1, -1)),
    (1, 300, 100, 4, 4, 128, True, (-1, -1)),  # sq > sk: 200 rows see no key
    (2, 64, 64, 8, 4, 8, True, (-1, -1)),      # head dim 8: padded to the 16-wide dot tile
]


@pytest.mark.gpu
def test_varlen_offsets_checked_on_gpu(monkeypatch):
    """On by default (one synchronization), named in the error; off with
    AITER_DIST_CHECK_VARLEN=0 (only valid offsets are passed then)."""
    monkeypatch.delenv("AITER_DIST_CHECK_VARLEN", raising=False)
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    bad = torch.tensor([0, 4, 12], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] is 12 but q has 10 rows.*"
                                         r"AITER_DIST_CHECK_VARLEN=0"):
        aiter_dist.flash_attn_varlen_func(q, q, q, bad, bad, 8, 8)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    want = aiter_dist.flash_attn_varlen_func(q, q, q, good, good, 6, 6, causal=True)
    monkeypatch.setenv("AITER_DIST_CHECK_VARLEN", "0")
    got = aiter_dist.flash_attn_varlen_func(q, q, q, good, good, 6, 6, causal=True)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_gpu(case, dtype):
    _check_against_ref(*case, dtype=dtype, device="cuda", factor=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES[::2], ids=lambda c: "-".join(map(str, c)))
def test_deterministic_path_gpu(case):
    _check_against_ref(*case, dtype=torch.bfloat16, device="cuda", factor=3.0,
                       deterministic=True)
    assert aiter_dist.last_path("flash_attn_bwd").startswith("triton-deterministic")


@pytest.mark.gpu
def test_deterministic_backward_gpu():
    q, k, v, do = _inputs(2, 1024, 1024, 8, 2, 128, torch.bfloat16, "cuda")
    f = lambda q, k, v: aiter_dist.flash_attn_func(q, k, v, causal=True, deterministic=True)  # noqa
    first, second = _grads(f, q, k, v, do), _grads(f, q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(64, 128, 8, 2), (64, 128, 8, 2, False, True),
                                    (64, 64, 4, 2, False, True)], ids=str)
@pytest.mark.parametrize("case", [(2, 777, 1500, 8, 8, 64, True, (-1, -1)),
                                  (1, 1024, 1024, 16, 4, 128, False, (-1, -1)),
                                  (1, 300, 100, 4, 4, 128, True, (-1, -1))],
                         ids=lambda c: "-".join(map(str, c)))
def test_one_kernel_backward_gpu(case, config):
    """The one-kernel backward with dQ added by atomics and by the copy engine's bulk reduce,
    whichever the default config picks."""
    from aiter_dist.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

    b, sq, sk, h, hk, d, causal, window = case
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.bfloat16, "cuda")
    out, lse = flash_attn_fwd(q, k, v, d ** -0.5, causal, window)
    grads = flash_attn_bwd(do, q, k, v, out, lse, d ** -0.5, causal, window, config=config)
    assert aiter_dist.last_path("flash_attn_bwd") == "triton-atomic-dq" + (
        "-bulk" if len(config) > 5 else "")
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0],
                 *(t.double() for t in (q, k, v, do)))[1:]
    low = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal, window)[0], q, k, v, do)[1:]
    for name, o, r, t in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_close_to_ref(f"{name} {case} {config}", o, r, t, factor=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,window", VARLEN_MODES + [(False, (128, 128))], ids=str)
def test_varlen_gpu(causal, window, d, deterministic):
    """8 sequences of mixed lengths (an empty one, q shorter and longer than k), GQA 8/2."""
    lens_q = [1, 300, 0, 777, 64, 1024, 129, 17]
    lens_k = [1, 300, 5, 1500, 64, 1024, 100, 33]
    _check_varlen(lens_q, lens_k, 8, 2, d, causal, window, torch.bfloat16, "cuda",
                  deterministic, factor=3.0)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("split,varlen", [(2, False), (3, False), (4, True)], ids=str)
def test_gqa_group_split_across_programs(split, varlen, deterministic):
    """dK/dV with a GQA group (8 query heads on 2 KV heads) shared by 2 or 4 programs: fp32
    partials summed in split order, the same as one program per group; 3 does not divide the
    group and takes one program, visibly."""
    from aiter_dist.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

    b, sq, sk, h, hk, d = 2, 37, 45, 8, 2, 16
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, torch.float32, "cpu", seed=5)
    args = (d ** -0.5, True, (20, 0))
    cu = {}
    if varlen:
        q, do = q.reshape(b * sq, h, d), do.reshape(b * sq, h, d)
        k, v = k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, d)
        cu = dict(cu_seqlens_q=torch.tensor([0, sq, 2 * sq], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, sk, 2 * sk], dtype=torch.int32),
                  max_seqlen_q=sq, max_seqlen_k=sk)
    out, lse = flash_attn_fwd(q, k, v, *args, **cu)
    base = (16, 16, 1, 1, False, False)
    want = flash_attn_bwd(do, q, k, v, out, lse, *args, **cu, deterministic=deterministic,
                          config=base)
    got = flash_attn_bwd(do, q, k, v, out, lse, *args, **cu, deterministic=deterministic,
                         config=base + (split,))
    path = aiter_dist.last_path("flash_attn_bwd")
    assert path.endswith(f"-split{split}") == (split != 3), path
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    again = flash_attn_bwd(do, q, k, v, out, lse, *args, **cu, deterministic=deterministic,
                           config=base + (split,))
    assert torch.equal(again[1], got[1]) and torch.equal(again[2], got[2])
    with pytest.raises(ValueError, match="split_group must be >= 1, got 0"):
        flash_attn_bwd(do, q, k, v, out, lse, *args, **cu, deterministic=deterministic,
                       config=base + (0,))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(64, 128, 8, 3, False, True, 4),
                                    (64, 128, 8, 2, False, False, 2)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_group_split_gpu(config, causal):
    """The one-kernel backward with the GQA group split over programs, on the GPU."""
    from aiter_dist.kernels.flash_attn import flash_attn_bwd, flash_attn_fwd

    q, k, v, do = _inputs(2, 777, 1024, 16, 4, 128, torch.bfloat16, "cuda")
    out, lse = flash_attn_fwd(q, k, v, 128 ** -0.5, causal, (-1, -1))
    grads = flash_attn_bwd(do, q, k, v, out, lse, 128 ** -0.5, causal, (-1, -1), config=config)
    assert aiter_dist.last_path("flash_attn_bwd").endswith(f"-split{config[6]}")
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal)[0],
                 *(t.double() for t in (q, k, v, do)))[1:]
    low = _grads(lambda q, k, v: attention_ref(q, k, v, None, causal)[0], q, k, v, do)[1:]
    for name, o, r, t in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_close_to_ref(f"{name} {config} causal={causal}", o, r, t, factor=3.0)


def test_attention_without_gradients_skips_autograd(monkeypatch):
    from aiter_dist.kernels import flash_attn as FA

    q, k, v, _ = _inputs(1, 9, 11, 2, 1, 16, torch.float32, "cpu")
    want = aiter_dist.flash_attn_func(q.requires_grad_(), k, v, causal=True)
    assert want.grad_fn is not None

    def no_function(*args):
        raise AssertionError("FlashAttnFunction.apply called without gradients")

    monkeypatch.setattr(FA.FlashAttnFunction, "apply", no_function)
    with torch.no_grad():
        got, lse = aiter_dist.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert got.grad_fn is None and torch.equal(got, want.detach()) and lse.shape == (1, 2, 9)


def test_small_problems_skip_tensor_descriptors(monkeypatch):
    """A default config with TMA serves problems above HOST_BOUND_SCORES through descriptors;
    smaller ones take the pointer kernels (same values)."""
    from aiter_dist.kernels import flash_attn as FA
    from aiter_dist.kernels._runtime import clear_plans

    clear_plans()
    monkeypatch.setattr(FA, "_fwd_blocks", lambda *a: FA.Blocks(16, 16, 1, 1, True))
    q, k, v, _ = _inputs(1, 20, 20, 2, 1, 16, torch.float32, "cpu", seed=2)
    try:
        small, _ = FA.flash_attn_fwd(q, k, v, 0.25, True, (-1, -1))
        assert aiter_dist.last_path("flash_attn") == "triton-interpreter"
        monkeypatch.setattr(FA, "HOST_BOUND_SCORES", 0)
        clear_plans()  # (the first call's plan holds its choice)
        large, _ = FA.flash_attn_fwd(q, k, v, 0.25, True, (-1, -1))
        assert aiter_dist.last_path("flash_attn") == "triton-interpreter-tma"
    finally:
        clear_plans()  # (plans made with the patched configs)
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-5)
