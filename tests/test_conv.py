"""conv2d: forward, data gradient and weight gradient against float64 F.conv2d; the nn.Conv2d
drop-in; bad input; torch.compile and opcheck on the custom ops."""
import pytest
import torch
import torch.nn.functional as F

import aiter_dist
from aiter_dist.kernels import conv as C
from aiter_dist.kernels.gemm import GemmConfig
from aiter_dist.testing import OPCHECK, assert_close_to_ref, assert_compiled_matches_eager

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, bias): small odd shapes
# covering stride 1/2, padding 0/1/'same'/'valid', dilation 1/2, groups 1/2/depthwise (with a
# channel multiplier), kernels 1/3/5/7, rectangular kernels, few- and many-channel groups (the
# flattened-K and per-tap kernels), stride phases without taps (stride 2, dilation 2).
CASES = [
    (2, 5, 9, 11, 7, 3, 1, 1, 1, 1, True),
    (2, 16, 7, 9, 20, 3, 2, 1, 1, 1, False),
    (1, 18, 9, 7, 12, 3, 2, 0, 2, 2, True),
    (2, 6, 9, 11, 12, 3, 2, 1, 1, 6, True),        # depthwise, multiplier 2
    (1, 7, 11, 9, 7, 5, 1, "same", 2, 7, False),   # depthwise, dilated, 'same'
    (2, 6, 10, 8, 6, (2, 4), 1, "same", 1, 1, True),  # even kernel: asymmetric 'same'
    (1, 3, 13, 11, 8, 7, 2, 3, 1, 1, True),        # the RGB stem shape class
    (3, 20, 5, 7, 17, 1, 1, 0, 1, 1, True),        # 1x1
    (2, 4, 7, 7, 8, 1, 2, 0, 1, 1, False),         # 1x1 stride 2 (downsample)
    (1, 4, 9, 9, 6, 3, 3, 2, 2, 2, False),         # stride 3, dilation 2
    (1, 10, 8, 9, 14, 5, 1, "valid", (1, 2), 1, True),
    (2, 12, 6, 5, 8, 3, (2, 1), (0, 1), 1, 4, True),
]


def _ids(case):
    return "x".join(map(str, case[:5])) + "-k{}s{}p{}d{}g{}b{}".format(*case[5:])


def _run(case, dtype, layout):
    """Ours, the float64 reference and PyTorch in ``dtype``: [out, dx, dw(, db)]."""
    N, ci, H, W, co, k, s, p, d, g, bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    x = torch.randn(N, ci, H, W, generator=gen)
    w = torch.randn(co, ci // g, kh, kw, generator=gen) / (ci // g * kh * kw) ** 0.5
    b = torch.randn(co, generator=gen) if bias else None
    ref_out = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    dy = torch.randn(ref_out.shape, generator=gen)

    def go(fn, dt):
        xs = x.to(dt).contiguous(memory_format=layout).detach().requires_grad_()
        ws = w.to(dt).contiguous(memory_format=layout).detach().requires_grad_()
        bs = b.to(dt).detach().requires_grad_() if bias else None
        out = fn(xs, ws, bs, s, p, d, g)
        out.backward(dy.to(dt))
        return [out, xs.grad, ws.grad] + ([bs.grad] if bias else [])

    return go(aiter_dist.conv2d, dtype), go(F.conv2d, torch.float64), go(F.conv2d, dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_conv2d_matches_float64(case, dtype, layout):
    ours, ref, low = _run(case, dtype, layout)
    for name, o, r, t in zip(["out", "dx", "dweight", "dbias"], ours, ref, low):
        assert o.dtype == dtype, name
        assert_close_to_ref(f"{name} {_ids(case)} {dtype}", o, r, t)
    # Output and dx keep the input's memory format, dweight the weight's (as cuDNN).
    for name, t in zip(["out", "dx", "dweight"], ours):
        assert t.is_contiguous(memory_format=layout), f"{name}: strides {t.stride()}"
    depthwise = case[1] == case[9]
    # 1x1 stride-1 16-bit NHWC: forward and dgrad are GEMMs on the GEMM kernel.
    pointwise = (case[5:9] == (1, 1, 0, 1) and case[9] == 1 and dtype != torch.float32
                 and layout == CL)
    for op in ("conv2d", "conv2d_dgrad", "conv2d_wgrad"):
        path = aiter_dist.last_path(op)
        assert path.startswith("triton") and path.endswith("-depthwise") == depthwise, (op, path)
        assert ("-gemm" in path) == (pointwise and op != "conv2d_wgrad"), (op, path)


@pytest.mark.parametrize("depthwise", [False, True])
def test_small_tiles_and_splits(depthwise):
    """Forced small tiles: several M/N tiles, partial channel blocks, several wgrad splits
    (fp32 partials summed in a fixed order), each pass alone."""
    g = 9 if depthwise else 1
    x = torch.randn(2, 9, 7, 6, dtype=torch.float64).float().contiguous(memory_format=CL)
    w = torch.randn(18, 9 // g, 3, 3).float()
    b = torch.randn(18)
    stride, pad, dil = (2, 1), (1, 1, 0, 0), (1, 2)
    cfg = C.ConvConfig(16, 16, 16, 1, 1, 1, 3)
    y = C.conv2d_fwd(x, w, b, stride, pad, dil, g, config=cfg)
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride, (1, 0), dil, g), atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(x64, w64, None, stride, (1, 0), dil, g).backward(dy.double())
    dx = C.conv2d_dgrad(dy, x, w, stride, pad, dil, g, config=cfg)
    dw, db = C.conv2d_wgrad(dy, x, w, stride, pad, dil, g, need_db=True, config=cfg)
    torch.testing.assert_close(dx, x64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, w64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, dy.double().sum((0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
    dw2, db2 = C.conv2d_wgrad(dy, x, w, stride, pad, dil, g, need_db=True, config=cfg)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)  # deterministic


# (N, C_in, H, W, C_out, kernel, stride, padding, dilation): channels a multiple of 8, so the
# wgrad runs on the TMA kernel: odd sizes, stride 1/2/3 (input phases), padding past the kernel,
# a phase holding no input pixel (1x1 input, stride 2), dilation, 1x1 dense (one flat row).
TMA_WGRAD_CASES = [
    (2, 16, 7, 9, 8, 3, 1, 1, 1),
    (1, 8, 9, 7, 16, 3, 2, 1, 1),
    (2, 24, 5, 6, 16, 1, 1, 0, 1),
    (2, 8, 7, 7, 8, 1, 2, 0, 1),
    (1, 16, 6, 9, 24, 3, 2, 0, 2),
    (1, 8, 5, 5, 8, 5, 3, 2, 1),
    (1, 8, 3, 3, 8, 3, 2, 4, 1),
    (2, 8, 1, 1, 16, 3, 2, 1, 1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TMA_WGRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_wgrad_tma_kernel(case, dtype):
    """The TMA wgrad (boxes of output pixels, stride phases, zero fill as the padding) against
    float64, with the built-in config and with forced small tiles and several splits, and
    bitwise equal when run again; dbias from the same pass."""
    N, ci, H, W, co, k, s, p, d = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(N, ci, H, W, generator=gen).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5).to(dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, None, s, p, d)
    dy = torch.randn(y64.shape, generator=gen).to(dtype).contiguous(memory_format=CL)
    y64.backward(dy.double())
    db_ref = dy.double().sum((0, 2, 3))
    # the same products in dtype, by PyTorch: the rounding the tolerance allows
    xl, wl = x.float().requires_grad_(), w.float().requires_grad_()
    F.conv2d(xl, wl, None, s, p, d).backward(dy.float())
    args = ((s, s), (p,) * 4, (d, d), 1)
    for wt in (w.contiguous(memory_format=CL), w):   # one split writes a channels_last dw itself
        for cfg in (None, C.ConvConfig(16, 16, 16, 1, 1, 8, 3)):
            dw, db = C.conv2d_wgrad(dy, x, wt, *args, need_db=True, config=cfg)
            assert aiter_dist.last_path("conv2d_wgrad").endswith("-tma"), cfg
            assert dw.stride() == wt.stride()
            assert_close_to_ref(f"dweight {case} {cfg}", dw, w64.grad, wl.grad.to(dtype))
            torch.testing.assert_close(db.double(), db_ref, atol=2e-2 * db_ref.abs().max(),
                                       rtol=0)
            dw2, db2 = C.conv2d_wgrad(dy, x, wt, *args, need_db=True, config=cfg)
            assert torch.equal(dw, dw2) and torch.equal(db, db2)


def test_wgrad_tma_only_where_it_applies():
    """fp32, grouped, and channel counts that leave NHWC pixels unaligned take the pointer
    kernel; ConvConfig(tma=False) asks for it; tma=True where TMA cannot serve is refused."""
    args = ((1, 1), (1,) * 4, (1, 1))
    cases = [(torch.float32, 8, 8, 1), (torch.bfloat16, 16, 16, 2), (torch.bfloat16, 12, 8, 1)]
    for dtype, ci, co, groups in cases:
        x = torch.randn(1, ci, 5, 4).to(dtype).contiguous(memory_format=CL)
        w = torch.randn(co, ci // groups, 3, 3).to(dtype)
        dy = torch.randn(1, co, 5, 4).to(dtype).contiguous(memory_format=CL)
        C.conv2d_wgrad(dy, x, w, *args, groups)
        assert aiter_dist.last_path("conv2d_wgrad") == "triton-interpreter", (dtype, ci, groups)
        with pytest.raises(ValueError, match="conv2d_wgrad: ConvConfig.tma=True."):
            C.conv2d_wgrad(dy, x, w, *args, groups, config=C.ConvConfig(16, 16, 16, tma=True))
    x = torch.randn(1, 8, 5, 4).bfloat16().contiguous(memory_format=CL)
    w, dy = torch.randn(8, 8, 3, 3).bfloat16(), torch.randn(1, 8, 5, 4).bfloat16()
    C.conv2d_wgrad(dy.contiguous(memory_format=CL), x, w, *args, 1,
                   config=C.ConvConfig(16, 16, 16, tma=False))
    assert aiter_dist.last_path("conv2d_wgrad") == "triton-interpreter"
    C.conv2d_wgrad(dy, x, w, *args, 1)   # NCHW dy: its channels are not contiguous
    assert aiter_dist.last_path("conv2d_wgrad") == "triton-interpreter"


def test_pointwise_gemm_route(monkeypatch):
    """1x1 bf16 NHWC convs run on the GEMM kernel, with a given GemmConfig too; a tuned conv
    config turns the route off; a GemmConfig for a 3x3 conv is refused."""
    x = torch.randn(2, 24, 5, 3).bfloat16().contiguous(memory_format=CL)
    w = (torch.randn(20, 24, 1, 1) / 5).bfloat16().contiguous(memory_format=CL)
    ref = F.conv2d(x.double(), w.double())
    args = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    y = C.conv2d_fwd(x, w, None, *args, config=GemmConfig(16, 32, 16, 1, 1, 1))
    assert aiter_dist.last_path("conv2d").startswith("triton-") and "-gemm" in \
        aiter_dist.last_path("conv2d")
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)
    key = C.conv_key(C.conv_geometry(x.shape, w.shape, *args), x.dtype)
    monkeypatch.setattr(C, "TUNED_CONFIGS", {("fwd", key): (16, 16, 16, 1, 1, 1, 1)})
    monkeypatch.setattr(C, "_configs", {})
    y2 = C.conv2d_fwd(x, w, None, *args)
    assert "-gemm" not in aiter_dist.last_path("conv2d")
    torch.testing.assert_close(y2.double(), ref, atol=2e-2, rtol=2e-2)
    # A batch of one made from an HWC image: channels_last to PyTorch, but its size-1 batch dim
    # has a stride the dense NHWC formula does not give.
    img = torch.randn(5, 3, 24).permute(2, 0, 1).unsqueeze(0).bfloat16()
    assert img.is_contiguous(memory_format=CL)
    monkeypatch.setattr(C, "TUNED_CONFIGS", {})
    y3 = aiter_dist.conv2d(img, w)
    assert "-gemm" in aiter_dist.last_path("conv2d")
    torch.testing.assert_close(y3.double(), F.conv2d(img.double(), w.double()), atol=2e-2,
                               rtol=2e-2)
    with pytest.raises(ValueError, match="conv2d: a GemmConfig serves 1x1"):
        C.conv2d_fwd(x, torch.randn(20, 24, 3, 3).bfloat16(), None, *args,
                     config=GemmConfig(16, 32, 16))


def _parse_key(key):
    """(N, C_in, H, W, C_out, kernel, stride, padding) of a square-kernel ``conv_key``."""
    _, shape, _, co, k, s, p, _, _ = key.split(" ")
    n, ci, h, w = map(int, shape.split("x"))
    return n, ci, h, w, int(co), int(k[1:].split("x")[0]), int(s[1:].split(",")[0]), int(
        p[1:].split(",")[0])


def test_tuned_table_entries_and_dispatch():
    """The measured table is well formed, and backend="auto" follows it (meta tensors: the
    dispatch without a GPU); an unlisted shape runs ours."""
    from aiter_dist.kernels.conv_tuned import TUNED as MEASURED

    assert MEASURED
    for key, passes in MEASURED.items():
        assert set(passes) == {"fwd", "dgrad", "wgrad"}, key
        n, ci, h, w, co, k, s, p = _parse_key(key)
        g = C.conv_geometry((n, ci, h, w), (co, ci, k, k), (s, s), (p,) * 4, (1, 1), 1)
        assert C.conv_key(g, torch.bfloat16) == key
        for ps, (won, cfg, ours_us, vendor_us) in passes.items():
            assert won in ("triton", "vendor") and ours_us > 0 and vendor_us > 0, (key, ps)
            assert (won == "triton") == (ours_us <= vendor_us), (key, ps)
            if cfg is not None:
                (GemmConfig(*cfg[1:]) if cfg[0] == "gemm" else C.ConvConfig(*cfg))
        x = torch.empty(n, ci, h, w, dtype=torch.bfloat16, device="meta")
        wt = torch.empty(co, ci, k, k, dtype=torch.bfloat16, device="meta")
        assert C.conv_backends(x, wt, (s, s), (p,) * 4, (1, 1), 1, "auto") == tuple(
            passes[ps][0] for ps in ("fwd", "dgrad", "wgrad")), key
    x = torch.empty(3, 5, 7, 7, dtype=torch.bfloat16, device="meta")
    wt = torch.empty(6, 5, 3, 3, dtype=torch.bfloat16, device="meta")
    assert C.conv_backends(x, wt, (1, 1), (1,) * 4, (1, 1), 1, "auto") == ("triton",) * 3


def test_only_some_gradients():
    """A frozen input or weight: only the gradients asked for are computed."""
    x = torch.randn(2, 5, 7, 7)
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    aiter_dist.conv2d(x, w, b, padding=1).sum().backward()
    x64, w64, b64 = x.double(), w.detach().double().requires_grad_(), \
        b.detach().double().requires_grad_()
    F.conv2d(x64, w64, b64, padding=1).sum().backward()
    torch.testing.assert_close(w.grad, w64.grad.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.grad, b64.grad.float(), atol=1e-4, rtol=1e-5)
    xg = x.clone().requires_grad_()
    aiter_dist.conv2d(xg, w.detach(), None, 2).sum().backward()
    x64 = x.double().requires_grad_()
    F.conv2d(x64, w.detach().double(), None, 2).sum().backward()
    torch.testing.assert_close(xg.grad, x64.grad.float(), atol=1e-4, rtol=1e-5)


def test_vendor_backend_and_fallbacks(monkeypatch):
    x, w = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)
    monkeypatch.setattr(C, "default_backend", "vendor")
    torch.testing.assert_close(aiter_dist.conv2d(x, w), F.conv2d(x, w))
    assert aiter_dist.last_path("conv2d") == "torch.conv2d"
    monkeypatch.setattr(C, "default_backend", "auto")
    # float64 and an empty batch are served by PyTorch, and say so.
    x64 = x.double().requires_grad_()
    y = aiter_dist.conv2d(x64, w.double(), None, 1, "same")
    y.sum().backward()
    assert aiter_dist.last_path("conv2d") == "torch.conv2d"
    assert aiter_dist.last_path("conv2d_dgrad") == "torch.convolution_backward"
    torch.testing.assert_close(y, F.conv2d(x.double(), w.double(), None, 1, "same"))
    assert aiter_dist.conv2d(x[:0], w).shape == (0, 6, 5, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        C.conv_backends(x, w, (1, 1), (0, 0, 0, 0), (1, 1), 1, backend="cudnn")


# ----------------------------------------------------------------------------- nn.Conv2d

@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1, bias=True),
                                    dict(padding="same", dilation=2, groups=3, bias=False)])
def test_nn_conv2d_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 9, 3, **kwargs)
    ours = aiter_dist.nn.Conv2d(6, 9, 3, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 9, 7)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert aiter_dist.last_path("conv2d").startswith("triton")
    ref.load_state_dict(ours.state_dict())  # and back


def test_nn_conv2d_padding_mode():
    with pytest.raises(ValueError, match=r"aiter_dist.nn.Conv2d: padding_mode='reflect'.*F.pad"):
        aiter_dist.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_op_and_fix():
    x, w = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: input has 5 channels but weight"):
        aiter_dist.conv2d(torch.randn(2, 5, 7, 7), w)
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: groups=3 must divide"):
        aiter_dist.conv2d(x, torch.randn(6, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: input must be 4-D.*unsqueeze\(0\)"):
        aiter_dist.conv2d(x[0], w)
    with pytest.raises(TypeError, match=r"aiter_dist.conv2d: input dtype torch.float16 differs "
                                        r"from weight dtype torch.float32; cast"):
        aiter_dist.conv2d(x.half(), w)
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: bias must have shape \(6,\)"):
        aiter_dist.conv2d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: padding='same' needs stride 1"):
        aiter_dist.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: padding must be 'valid', 'same'"):
        aiter_dist.conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match=r"aiter_dist.conv2d: the \(dilated\) kernel 3x3"):
        aiter_dist.conv2d(x, w, dilation=4)
    with pytest.raises(TypeError, match=r"aiter_dist.conv2d: input has dtype torch.int64"):
        aiter_dist.conv2d(x.long(), w)


# ----------------------------------------------------------------------------- torch.compile



def test_compile_matches_eager():
    x = torch.randn(2, 5, 9, 7).contiguous(memory_format=CL)
    assert_compiled_matches_eager(lambda x, w, b: aiter_dist.conv2d(x * 2, w, b, 2, 1).relu(),
                                  (x, torch.randn(6, 5, 3, 3), torch.randn(6)),
                                  check_strides=True)


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_opcheck(layout):
    x = torch.randn(2, 4, 7, 6).contiguous(memory_format=layout)
    w = torch.randn(6, 2, 3, 3).contiguous(memory_format=layout)
    b = torch.randn(6)
    args = ([2, 1], [1, 2, 1, 1], [1, 1], 2, "triton,triton,triton")
    torch.library.opcheck(torch.ops.aiter_dist.conv2d_fwd.default, (x, w, b, *args),
                          test_utils=OPCHECK)
    dy = torch.ops.aiter_dist.conv2d_fwd(x, w, b, *args)
    for need in ((True, True, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(torch.ops.aiter_dist.conv2d_bwd.default,
                              (torch.randn_like(dy), x, w, *args, *need),
                              test_utils=OPCHECK[:3])


# ----------------------------------------------------------------------------- GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    (8, 64, 56, 56, 64, 3, 1, 1, 1, 1, False),      # ResNet-50 layer1 3x3
    (8, 256, 56, 56, 128, 1, 1, 0, 1, 1, False),    # 1x1 reduce
    (8, 128, 56, 56, 128, 3, 2, 1, 1, 1, False),    # stride-2 3x3 (layer2 entry)
    (8, 1024, 14, 14, 2048, 1, 2, 0, 1, 1, False),  # 1x1 stride-2 downsample
    (8, 3, 224, 224, 64, 7, 2, 3, 1, 1, False),     # stem
    (8, 96, 28, 28, 96, 3, 1, 1, 1, 96, True),      # depthwise
], ids=_ids)
def test_conv2d_gpu_resnet_bf16(case):
    N, ci, H, W, co, k, s, p, d, g, bias = case
    dev, bf16 = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, ci, H, W, device=dev, generator=gen).contiguous(memory_format=CL)
    w = torch.randn(co, ci // g, k, k, device=dev, generator=gen) / (ci // g * k * k) ** 0.5
    w = w.contiguous(memory_format=CL)
    b = torch.randn(co, device=dev, generator=gen) if bias else None
    outs = {}
    for name, fn, dt in (("ours", aiter_dist.conv2d, bf16), ("ref", F.conv2d, torch.float64),
                         ("low", F.conv2d, bf16)):
        xs, ws = x.to(dt).detach().requires_grad_(), w.to(dt).detach().requires_grad_()
        bs = b.to(dt) if bias else None
        out = fn(xs, ws, bs, s, p, d, g)
        out.backward(torch.ones_like(out) / out[0].numel() ** 0.5)
        outs[name] = (out, xs.grad, ws.grad)
    for i, what in enumerate(("out", "dx", "dweight")):
        assert_close_to_ref(f"{what} {_ids(case)}", outs["ours"][i], outs["ref"][i],
                            outs["low"][i])
    assert outs["ours"][0].is_contiguous(memory_format=CL)
    assert aiter_dist.last_path("conv2d").startswith("triton")


def test_conv2d_module_under_autocast():
    """Under CPU autocast (bf16) the module casts input, weight and bias as nn.Conv2d does; the
    fp32 parameters receive fp32 gradients."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 6, 3, padding=1)
    mod = aiter_dist.nn.Conv2d(4, 6, 3, padding=1)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = mod(x), ref(x)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert mod.weight.grad.dtype == torch.float32 and mod.bias.grad.dtype == torch.float32


def test_weight_gradient_keeps_the_weights_strides():
    """A 1x1 channels_last weight is also plainly contiguous: dweight must take the parameter's
    exact strides (DDP's bucket views have them)."""
    w = torch.randn(6, 4, 1, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    aiter_dist.conv2d(x, w).sum().backward()
    assert w.grad.stride() == w.stride(), (w.grad.stride(), w.stride())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 64, 56, 256, 1, 1, 0), (8, 256, 56, 512, 1, 2, 0),
                                   (8, 128, 28, 128, 3, 1, 1), (8, 256, 28, 256, 3, 2, 1),
                                   (5, 72, 13, 40, 5, 1, 2), (8, 512, 7, 512, 3, 1, 1)],
                         ids=lambda s: "n{}c{}hw{}o{}k{}s{}p{}".format(*s))
def test_conv2d_wgrad_tma_gpu(shape):
    """ResNet-like wgrads on the TMA kernel in bf16 (built-in config, then one split and four),
    against float64 and bitwise repeatable, dbias included."""
    n, ci, hw, co, k, s, p = shape
    dev, bf16 = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(n, ci, hw, hw, device=dev, generator=gen).to(bf16).contiguous(
        memory_format=CL)
    w = (torch.randn(co, ci, k, k, device=dev, generator=gen) / (ci * k * k) ** 0.5).to(
        bf16).contiguous(memory_format=CL)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = F.conv2d(x64, w64, None, s, p)
    dy = torch.randn(y64.shape, device=dev, generator=gen).to(bf16).contiguous(
        memory_format=CL)
    y64.backward(dy.double())
    args = ((s, s), (p,) * 4, (1, 1), 1)
    for cfg in (None, C.ConvConfig(128, 64, 64, 4, 3, 8, 1), C.ConvConfig(64, 128, 64, 4, 4, 8, 4)):
        dw, db = C.conv2d_wgrad(dy, x, w, *args, need_db=True, config=cfg)
        assert aiter_dist.last_path("conv2d_wgrad") == "triton-tma", cfg
        assert_close_to_ref(f"wgrad {shape} {cfg}", dw, w64.grad, w64.grad.to(bf16))
        torch.testing.assert_close(db.double(), dy.double().sum((0, 2, 3)), atol=0.5, rtol=1e-2)
        assert torch.equal(dw, C.conv2d_wgrad(dy, x, w, *args, need_db=True, config=cfg)[0])


@pytest.mark.gpu
def test_conv2d_gpu_tuned_configs():
    """Every measured config of the table (batch-32 shapes) computes the right thing."""
    from aiter_dist.kernels.conv_tuned import TUNED as MEASURED

    dev, bf16 = "cuda", torch.bfloat16
    for key, passes in MEASURED.items():
        n, ci, h, w_, co, k, s, p = _parse_key(key)
        if n != 32:
            continue
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(n, ci, h, w_, device=dev, generator=gen).to(bf16).contiguous(
            memory_format=CL)
        w = (torch.randn(co, ci, k, k, device=dev, generator=gen) / (ci * k * k) ** 0.5).to(
            bf16).contiguous(memory_format=CL)
        args = ((s, s), (p,) * 4, (1, 1), 1)
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        y64 = F.conv2d(x64, w64, None, s, p)
        dy = torch.randn(y64.shape, device=dev, generator=gen).to(bf16)
        y64.backward(dy.double())
        low = F.conv2d(x, w, None, s, p)
        for ps, (_, cfg, _, _) in passes.items():
            if cfg is None:
                continue
            cfg = GemmConfig(*cfg[1:]) if cfg[0] == "gemm" else C.ConvConfig(*cfg)
            if ps == "fwd":
                got, ref = C.conv2d_fwd(x, w, None, *args, config=cfg), y64
            elif ps == "dgrad":
                got, ref = C.conv2d_dgrad(dy, x, w, *args, config=cfg), x64.grad
            else:
                got, ref = C.conv2d_wgrad(dy, x, w, *args, config=cfg)[0], w64.grad
            assert_close_to_ref(f"{ps} {key} {cfg}", got, ref, ref.to(bf16) if ps != "fwd"
                                else low)
