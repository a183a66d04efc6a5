"""torch.compile sees through every public op: each is a torch.library custom op (fake
implementation, registered autograd) that ``torch.compile(fullgraph=True)`` traces without a
graph break, matching eager forward and backward; ``torch.library.opcheck`` passes on each.

CPU tier: the ``aot_eager`` backend (no C++ toolchain needed), kernels through the interpreter,
collectives on 2 CPU ranks. GPU tier: Inductor."""
import pytest
import torch

import aiter_dist
from aiter_dist.testing import OPCHECK, assert_compiled_matches_eager, run_distributed

# torch's schema check multiplies inputs, which fp8 tensors do not support on CPU.
OPCHECK_FP8 = OPCHECK[1:]


def _backend():
    return "inductor" if torch.cuda.is_available() else "aot_eager"


def _compare(fn, inputs, atol=1e-5):
    """fn compiled (fullgraph) and eager: the same outputs and the same input gradients."""
    assert_compiled_matches_eager(fn, inputs, atol, backend=_backend())


def _device():
    return aiter_dist.local_device()


def test_norms_compile():
    dev = _device()
    x, r = torch.randn(2, 5, 24, device=dev), torch.randn(2, 5, 24, device=dev)
    w = torch.rand(24, device=dev) + 0.5
    _compare(lambda x, w: aiter_dist.rms_norm(x * 2, w).sin(), (x, w))
    _compare(lambda x, r, w: sum(t.sum(-1) for t in aiter_dist.add_rms_norm(x, r, w)), (x, r, w))
    torch.library.opcheck(torch.ops.aiter_dist.rms_norm_fwd.default, (x, w, r, 1e-6),
                          test_utils=OPCHECK)
    y, res, rstd = torch.ops.aiter_dist.rms_norm_fwd(x, w, r, 1e-6)
    torch.library.opcheck(torch.ops.aiter_dist.rms_norm_bwd.default,
                          (torch.randn_like(x), res, w, rstd, torch.randn_like(x), False),
                          test_utils=OPCHECK)


def test_attention_compiles():
    dev = _device()
    q, k, v = (torch.randn(1, 9, 4, 16, device=dev) for _ in range(3))
    _compare(lambda q, k, v: aiter_dist.flash_attn_func(q, k[:, :, :2], v[:, :, :2],
                                                        causal=True), (q, k, v), atol=1e-4)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
    _compare(lambda q, k, v: aiter_dist.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5,
                                                               window_size=(2, 0)),
             (q, k, v), atol=1e-4)
    args = (q, k, v, None, None, 0, 0, 0.25, True, -1, 0, False)
    torch.library.opcheck(torch.ops.aiter_dist.flash_attn_fwd.default, args, test_utils=OPCHECK)


def test_varlen_offsets_are_checked_inside_compiled_code():
    q = torch.randn(7, 2, 16, device=_device())
    f = torch.compile(lambda q, cu: aiter_dist.flash_attn_varlen_func(q, q, q, cu, cu, 8, 8),
                      fullgraph=True, backend=_backend())
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] is 12 but q has 7 rows"):
        f(q, torch.tensor([0, 4, 12], dtype=torch.int32, device=q.device))


def test_gemms_compile():
    dev = _device()
    x, w, b = torch.randn(2, 3, 40, device=dev), torch.randn(24, 40, device=dev), \
        torch.randn(24, device=dev)
    _compare(lambda x, w, b: aiter_dist.linear(x, w, b).relu(), (x, w, b), atol=1e-4)
    _compare(lambda x, w: aiter_dist.tgemm.mm(x, w, backend="triton"), (x, w), atol=1e-4)
    torch.library.opcheck(torch.ops.aiter_dist.linear.default, (x, w, b, "triton,triton,triton",
                                                                "linear"), test_utils=OPCHECK)
    xq, xs = aiter_dist.quantize_per_token_fp8(torch.randn(5, 256, device=dev))
    wq, ws = aiter_dist.quantize_per_token_fp8(torch.randn(7, 256, device=dev))
    ws = ws.t().contiguous()
    f = torch.compile(lambda *a: aiter_dist.gemm_a8w8(*a, dtype=torch.float32), fullgraph=True,
                      backend=_backend())
    torch.testing.assert_close(f(xq, wq, xs, ws),
                               aiter_dist.gemm_a8w8(xq, wq, xs, ws, dtype=torch.float32))
    torch.library.opcheck(torch.ops.aiter_dist.gemm_a8w8.default,
                          (xq, wq, xs, ws, None, torch.float32), test_utils=OPCHECK_FP8)
    bx, bxs = aiter_dist.quantize_per_block_fp8(torch.randn(5, 256, device=dev), (1, 128))
    bw, bws = aiter_dist.quantize_per_block_fp8(torch.randn(7, 256, device=dev), (128, 128))
    torch.library.opcheck(torch.ops.aiter_dist.gemm_a8w8_blockscale.default,
                          (bx, bw, bxs, bws, torch.float32), test_utils=OPCHECK_FP8)


def test_fakes_match_real_layouts_for_strided_inputs():
    """Dense inputs with permuted strides: each fake output has the real output's strides
    (Inductor asserts them), and a backward asked for some gradients returns no aliases."""
    dev = _device()
    fake_only = ("test_faketensor",)
    x = torch.randn(5, 2, 24, device=dev).transpose(0, 1)
    w = torch.rand(24, device=dev) + 0.5
    torch.library.opcheck(torch.ops.aiter_dist.rms_norm_fwd.default, (x, w, None, 1e-6),
                          test_utils=fake_only)
    y, _, rstd = torch.ops.aiter_dist.rms_norm_fwd(x, w, None, 1e-6)
    torch.library.opcheck(torch.ops.aiter_dist.rms_norm_bwd.default,
                          (torch.randn_like(x), x, w, rstd, None, False), test_utils=fake_only)
    q, k, v = (torch.randn(1, 4, 9, 16, device=dev).transpose(1, 2) for _ in range(3))
    out, lse = torch.ops.aiter_dist.flash_attn_fwd(q, k, v, None, None, 0, 0, 0.25, True, -1, 0,
                                                   False)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.aiter_dist.flash_attn_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, 0.25,
                               True, -1, 0, deterministic), test_utils=fake_only)
    xl, wl = torch.randn(3, 2, 40, device=dev).transpose(0, 1), torch.randn(24, 40, device=dev)
    dy = torch.randn(2, 3, 24, device=dev)
    for need in ((True, True, True), (True, False, False), (False, True, False),
                 (False, False, True), (False, False, False)):
        torch.library.opcheck(torch.ops.aiter_dist.linear_bwd.default,
                              (dy, xl, wl, "triton,triton,triton", "linear", *need),
                              test_utils=OPCHECK)


def test_compiled_linear_with_a_frozen_weight():
    """A bias-free projection whose weight needs no gradient (a frozen layer): the compiled
    backward asks linear_bwd for dx alone."""
    dev = _device()
    w = torch.randn(24, 40, device=dev)
    _compare(lambda x: aiter_dist.linear(x, w).relu(), (torch.randn(2, 3, 40, device=dev),),
             atol=1e-4)


def _collectives_compile(rank, world):
    from aiter_dist.comm import tensor_parallel as tp

    dev = aiter_dist.local_device()
    torch.manual_seed(0)  # the same inputs on every rank, then made rank-specific
    x = torch.randn(2 * world, 8, device=dev) + rank
    res = torch.randn(2 * world, 8, device=dev)
    shard = torch.randn(2, 8, device=dev)
    w = torch.rand(8, device=dev) + 0.5
    _compare(lambda x: aiter_dist.all_reduce(x * 2).sin(), (x,))
    _compare(lambda x: aiter_dist.all_gather(x, dim=1).sin(), (x,))
    _compare(lambda x: aiter_dist.reduce_scatter(x).sin(), (x,))
    _compare(lambda x, r, w: sum(t.sum(-1) for t in aiter_dist.all_reduce_add_rms_norm(x, r, w)),
             (x, res, w))
    _compare(lambda x, r, w: sum(t.sum(-1) for t in aiter_dist.reduce_scatter_add_rms_norm(
        x, r, w)), (x, shard, w))
    _compare(lambda s, w: aiter_dist.rms_norm_all_gather(s, w).sin(), (shard, w))
    _compare(lambda x, r, w: aiter_dist.all_reduce_add_rms_norm_fp8(x, r, w)[2].sin(),
             (x, res, w))
    _compare(lambda x: aiter_dist.comm.copy_to_parallel_region(x).sin() * (rank + 1), (x,))
    _compare(lambda x: tp.gather_last_dim(x).sin(), (x,))
    _compare(lambda x: tp.split_first_dim(x).sin() * (rank + 1), (x,))
    name = torch.distributed.group.WORLD.group_name
    for op, args in (("all_reduce", (x, name, "auto")), ("all_gather", (x, 0, name, "auto")),
                     ("reduce_scatter", (x, 0, name, "auto")),
                     ("all_reduce_add_rms_norm", (x, res, w, 1e-6, name, "auto")),
                     ("reduce_scatter_add_rms_norm", (x, shard, w, 1e-6, name, "auto")),
                     ("rms_norm_all_gather", (shard, w, 1e-6, name, "auto")),
                     ("copy_to_parallel_region", (x, name)), ("gather_region", (x, -1, name)),
                     ("split_region", (x, 0, name))):
        torch.library.opcheck(getattr(torch.ops.aiter_dist, op).default, args,
                              test_utils=OPCHECK)
    return True


def test_collectives_compile_cpu():
    run_distributed(_collectives_compile, 2, timeout=600)


def _training_ops_compile():
    """conv2d, SwiGLU, cross-entropy and RoPE on the local device (each op's own test file
    compiles it on CPU tensors; a CUDA tensor's call reads host state that tracing must skip)."""
    dev = _device()
    cl = torch.channels_last
    x = torch.randn(2, 5, 9, 7, device=dev).contiguous(memory_format=cl)
    w, b = torch.randn(6, 5, 3, 3, device=dev), torch.randn(6, device=dev)
    _compare(lambda x, w, b: aiter_dist.conv2d(x * 2, w, b, 2, 1).relu(), (x, w, b), atol=1e-3)
    gu = torch.randn(3, 5, 26, device=dev)
    _compare(lambda gu: aiter_dist.swiglu(*(gu * 2).chunk(2, -1)).sin(), (gu,))
    logits = torch.randn(7, 37, device=dev)
    t = torch.tensor([0, 5, 36, -100, 2, 2, 9], device=dev)
    _compare(lambda x: aiter_dist.cross_entropy(x * 2, t, label_smoothing=0.1), (logits,))
    q, k = torch.randn(2, 5, 3, 16, device=dev), torch.randn(2, 5, 1, 16, device=dev)
    pos = torch.arange(9, device=dev, dtype=torch.float32)[:, None]
    freqs = pos * torch.rand(8, device=dev)
    cos, sin = freqs.cos(), freqs.sin()
    _compare(lambda q, k: sum(t.sum((-1, -2)) for t in aiter_dist.apply_rotary_emb_qk(
        q * 2, k, cos, sin, seqlen_offsets=3)), (q, k))


@pytest.mark.gpu
def test_single_gpu_ops_compile_with_inductor():
    test_norms_compile()
    test_attention_compiles()
    test_gemms_compile()
    _training_ops_compile()


def test_training_ops_compile():
    """The GPU test's training-op cases on this machine's device (aot_eager on CPU)."""
    _training_ops_compile()
