"""GEMM: linear (forward, dgrad, wgrad), the fp8 GEMMs and quantizers, dispatch, bad input.

CPU tier: the kernels through Triton's interpreter at small odd shapes, against float64; both
kernel paths (the tensor-descriptor one runs in the interpreter too). GPU tier (-m gpu): real
sizes, the Hopper TMA path, and every config of the tuned table.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import aiter_dist
from aiter_dist.kernels import gemm as G
from aiter_dist.kernels import gemm_fp8 as Q
from aiter_dist.kernels.gemm_tuned import TUNED
from aiter_dist.testing import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ON_CPU = "triton-interpreter"


def _grads(fn, inputs, dy):
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, leaves, dy)


def _check_linear(x, w, b, floor16=None, path=ON_CPU):
    """aiter_dist.linear's output and gradients against float64, within twice PyTorch's own
    error in the same dtype."""
    name = f"linear {tuple(x.shape)}x{tuple(w.shape)} {x.dtype} bias={b is not None}"
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    dy = torch.randn(*x.shape[:-1], w.shape[0], device=x.device).to(x.dtype)
    out, grads = _grads(aiter_dist.linear, inputs, dy)
    assert aiter_dist.last_path("linear") == path
    assert aiter_dist.last_path("linear.dgrad") == path
    assert aiter_dist.last_path("linear.wgrad") == path
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref, ref_grads = _grads(G.linear_ref, ref_in, dy.double())
    lp_in = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    torch_out, torch_grads = _grads(F.linear, lp_in, dy)
    assert_close_to_ref(name, out, ref, torch_out)
    floor = None if x.dtype == torch.float32 else floor16
    for what, g, r, t in zip(("dx", "dW", "db"), grads, ref_grads, torch_grads):
        assert g.dtype == x.dtype and g.shape == r.shape
        assert_close_to_ref(f"{name} {what}", g, r, t, floor=floor)


# ----------------------------------------------------------------------------- CPU tier: linear

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (33, 17, 65), ((2, 3), 9, 20)], ids=str)
def test_linear_matches_float64(shape, dtype, bias):
    torch.manual_seed(0)
    lead, n, k = shape
    lead = lead if isinstance(lead, tuple) else (lead,)
    x = torch.randn(*lead, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    _check_linear(x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_transposed_strides(dtype):
    # x and w as transposed views (a's M, b's N contiguous) and a 3-D x that cannot be flattened
    # into a view: the kernel reads the strides, no .contiguous() on the way in.
    torch.manual_seed(1)
    _check_linear(torch.randn(21, 11).to(dtype).t(), torch.randn(21, 6).to(dtype).t(),
                  torch.randn(6).to(dtype))
    _check_linear(torch.randn(2, 21, 3).to(dtype).transpose(1, 2), torch.randn(5, 21).to(dtype),
                  None)


def test_linear_empty_reduction():
    x, w, b = torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    out = aiter_dist.linear(x, w, b)
    torch.testing.assert_close(out, b.expand(3, 4))


def test_linear_under_autocast():
    x = torch.randn(9, 24, requires_grad=True)
    w = torch.randn(10, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aiter_dist.linear(x, w)
    assert out.dtype == torch.bfloat16 and aiter_dist.last_path("linear") == ON_CPU
    ref = x.detach().bfloat16().double() @ w.detach().bfloat16().double().T
    assert_close_to_ref("autocast linear", out, ref, (x.bfloat16() @ w.bfloat16().T).detach())
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- CPU tier: paths

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nt", "nn", "tn"])
@pytest.mark.parametrize("subtile", [False, True], ids=["store", "subtile"])
@pytest.mark.parametrize("device_tma", [True, False], ids=["device-desc", "host-desc"])
def test_tma_kernel_in_interpreter(layout, dtype, subtile, device_tma, monkeypatch):
    # Descriptors built in the kernel (the default) or by the host. 16x16 tiles: 6 tiles (partial ones at the edge) over the interpreter's 2 programs (the
    # persistent loop), K = 40 in steps of 16 (a zero-filled tail), each operand layout the
    # three linear passes use; every layout's rows are 16-byte aligned, as TMA needs.
    monkeypatch.setattr(G, "DEVICE_TMA", device_tma)
    torch.manual_seed(2)
    M, N, K = 40, 24, 40
    a = torch.randn(M, K).to(dtype) if layout[0] == "n" else torch.randn(K, M).to(dtype).t()
    b = torch.randn(N, K).to(dtype).t() if layout[1] == "t" else torch.randn(K, N).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = G.matmul(a, b, bias, tma=True, config=G.GemmConfig(16, 16, 16, 2, 1, 1, True, subtile))
    assert aiter_dist.last_path("matmul") == "triton-interpreter-tma"
    ref = G.gemm_ref(a.double(), b.double(), bias.double())
    assert_close_to_ref(f"tma {layout}", out, ref, a @ b + bias)


def test_tma_falls_back_to_pointers_when_unaligned():
    a, b = torch.randn(5, 7), torch.randn(7, 3)  # rows of 28 and 12 bytes
    out = G.matmul(a, b, tma=True)
    assert aiter_dist.last_path("matmul") == ON_CPU
    assert_close_to_ref("unaligned", out, a.double() @ b.double(), a @ b)


# ----------------------------------------------------------------------------- CPU tier: fp8

def _fp8_rowwise(M, N, K, seed=0):
    torch.manual_seed(seed)
    xq, xs = aiter_dist.quantize_per_token_fp8(torch.randn(M, K))
    wq, ws = aiter_dist.quantize_per_token_fp8(torch.randn(N, K))
    return xq, wq, xs, ws.t()


def _fp8_blocks(M, N, K, seed=0):
    torch.manual_seed(seed)
    xq, xs = aiter_dist.quantize_per_block_fp8(torch.randn(M, K), (1, 128))
    wq, ws = aiter_dist.quantize_per_block_fp8(torch.randn(N, K), (128, 128))
    return xq, wq, xs, ws


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (33, 17, 300)], ids=str)
def test_gemm_a8w8_matches_dequantized_float64(shape, dtype):
    xq, wq, xs, ws = _fp8_rowwise(*shape)
    bias = torch.randn(shape[1])
    out = aiter_dist.gemm_a8w8(xq, wq, xs, ws, bias, dtype=dtype)
    assert out.dtype == dtype and aiter_dist.last_path("gemm_a8w8") == ON_CPU
    ref = Q.gemm_a8w8_ref(xq, wq, xs, ws, bias, torch.float64)
    assert_close_to_ref(f"gemm_a8w8 {shape}", out, ref, ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (33, 17, 300), (5, 200, 260)], ids=str)
def test_gemm_a8w8_blockscale_matches_dequantized_float64(shape, dtype):
    xq, wq, xs, ws = _fp8_blocks(*shape)
    out = aiter_dist.gemm_a8w8_blockscale(xq, wq, xs, ws, dtype=dtype)
    assert aiter_dist.last_path("gemm_a8w8_blockscale") == ON_CPU
    ref = Q.gemm_a8w8_blockscale_ref(xq, wq, xs, ws, torch.float64)
    assert_close_to_ref(f"blockscale {shape}", out, ref, ref.to(dtype))


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("block_n", [16, 256])
def test_fp8_kernel_paths(tma, block_n):
    # block_n 16: a tile's columns share one 128-column weight scale (folded into the row scale);
    # 256: two per tile. 40x264x272: every fp8 row 16-byte aligned, so TMA takes it.
    M, N, K = 40, 264, 272
    cfg = G.GemmConfig(16, block_n, 128, 2, 1, 1)
    xq, wq, xs, ws = _fp8_blocks(M, N, K, seed=3)
    out = Q.gemm_a8w8_blockscale_fwd(xq, wq, xs, ws, config=cfg, tma=tma)
    path = ON_CPU + ("-tma" if tma else "")
    assert aiter_dist.last_path("gemm_a8w8_blockscale") == path
    ref = Q.gemm_a8w8_blockscale_ref(xq, wq, xs, ws, torch.float64)
    assert_close_to_ref("blockscale path", out, ref, ref.to(out.dtype))
    xq, wq, xs, ws = _fp8_rowwise(M, N, K, seed=4)
    out = Q.gemm_a8w8_fwd(xq, wq, xs, ws, config=cfg._replace(block_k=64), tma=tma)
    assert aiter_dist.last_path("gemm_a8w8") == path
    ref = Q.gemm_a8w8_ref(xq, wq, xs, ws, None, torch.float64)
    assert_close_to_ref("rowwise path", out, ref, ref.to(out.dtype))


@pytest.mark.parametrize("block", [None, (1, 128), (128, 128), (3, 5)], ids=str)
def test_quantizers_round_trip_within_half_a_step(block):
    torch.manual_seed(5)
    x = torch.randn(67, 300) * torch.logspace(-3, 3, 300)  # many binades per row
    x[5] = 0.0  # an all-zero block
    if block is None:
        q, scale = aiter_dist.quantize_per_token_fp8(x)
        block = (1, x.shape[1])
        assert scale.shape == (67, 1)
    else:
        q, scale = aiter_dist.quantize_per_block_fp8(x, block)
        assert scale.shape == (math.ceil(67 / block[0]), math.ceil(300 / block[1]))
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    full = scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:67, :300]
    v = x.double() / full
    # Half an e4m3 step: 2^-4 of the value's binade (normals), 2^-10 below 2^-6 (subnormals).
    half_step = torch.maximum(v.abs() * 2.0 ** -4, torch.full_like(v, 2.0 ** -10)) * full
    err = (Q.dequantize_fp8(q, scale, block) - x.double()).abs()
    assert (err <= half_step * (1 + 1e-6)).all()
    assert q.float().abs().amax().item() == Q.FP8_MAX  # each block's largest maps to 448


# ----------------------------------------------------------------------------- CPU tier: dispatch

def test_tgemm_triton_backend_and_module_switch(monkeypatch):
    torch.manual_seed(6)
    x = torch.randn(4, 5, 12, requires_grad=True)
    w = torch.randn(7, 12, requires_grad=True)
    out = aiter_dist.tgemm.mm(x, w, backend="triton")
    assert aiter_dist.last_path("tgemm.mm") == ON_CPU
    out.sum().backward()
    assert aiter_dist.last_path("tgemm.mm.wgrad") == ON_CPU
    torch.testing.assert_close(out, x @ w.T)
    torch.testing.assert_close(w.grad, torch.ones(20, 7).T @ x.detach().reshape(20, 12))
    aiter_dist.tgemm.mm(x, w)
    assert aiter_dist.last_path("tgemm.mm") == "torch.linear"  # CPU default: F.linear
    # The module switch reaches the tensor-parallel layers, which compute through tgemm.mm.
    monkeypatch.setattr(aiter_dist.tgemm, "default_backend", "triton")
    layer = aiter_dist.nn.ColumnParallelLinear(12, 6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert aiter_dist.last_path("tgemm.mm") == ON_CPU
    aiter_dist.linear(x, w, backend="vendor")
    assert aiter_dist.last_path("linear") == "torch.linear"


def test_dispatch_follows_the_table(monkeypatch):
    cuda = torch.device("cuda")  # only the table is consulted: no GPU needed
    M, N, K = 4096, 14336, 4096
    fwd, dgrad, wgrad = (G.shape_class(lay, "bf16", m, n, k)
                         for lay, m, n, k in (("nt", M, N, K), ("nn", M, K, N), ("tn", N, K, M)))
    assert fwd == "nt bf16 4096x16384x4096" and wgrad == "tn bf16 16384x4096x4096"
    monkeypatch.setitem(TUNED, fwd, {"config": None, "winner": "vendor"})
    monkeypatch.setitem(TUNED, dgrad, {"config": None, "winner": "triton"})
    monkeypatch.delitem(TUNED, wgrad, raising=False)  # unmeasured: the caller's preference
    pick = G.linear_backends
    assert pick("linear", M, N, K, torch.bfloat16, cuda, "auto", "triton") == (
        "vendor", "triton", "triton")
    assert pick("tgemm.mm", M, N, K, torch.bfloat16, cuda, "auto", "vendor") == (
        "vendor", "triton", "vendor")
    assert pick("linear", M, N, K, torch.bfloat16, cuda, "triton", "vendor") == ("triton",) * 3


def test_tuned_table_is_well_formed():
    for key, entry in TUNED.items():
        layout, kind, sizes = key.split(" ")
        assert layout in ("nt", "nn", "tn") and kind in ("bf16", "fp16", "fp32", "fp8",
                                                         "fp8-block"), key
        assert all(int(s) == 2 ** int(math.log2(int(s))) for s in sizes.split("x")), key
        assert entry["winner"] in ("triton", "vendor", "unmeasured"), key
        if entry["config"] is not None:
            cfg = G.GemmConfig(*entry["config"])
            assert kind != "fp8-block" or cfg.block_k == 128, key


# ----------------------------------------------------------------------------- CPU tier: bad input

def test_linear_bad_input():
    x, w = torch.randn(2, 6), torch.randn(3, 6)
    with pytest.raises(ValueError, match="linear: input's last dimension 6 must equal weight's "
                                         "in_features 5"):
        aiter_dist.linear(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="linear: weight must be 2-D"):
        aiter_dist.linear(x, torch.randn(6))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(3,\)"):
        aiter_dist.linear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="linear: input dtype torch.float32 differs from weight "
                                        "dtype torch.float16; cast one"):
        aiter_dist.linear(x, w.half())
    with pytest.raises(TypeError, match="linear: input has dtype torch.int64"):
        aiter_dist.linear(torch.ones(2, 6, dtype=torch.long), w)
    with pytest.raises(ValueError, match="linear: weight is on meta but input is on cpu; move "
                                         "them to one device"):
        aiter_dist.linear(x, w.to("meta"))
    with pytest.raises(ValueError, match="linear: backend must be one of"):
        aiter_dist.linear(x, w, backend="cublas")


def test_fp8_bad_input():
    xq, wq, xs, ws = _fp8_rowwise(4, 3, 32)
    with pytest.raises(TypeError, match="gemm_a8w8: xq has dtype torch.bfloat16, expected "
                                        "torch.float8_e4m3fn; quantize it first with "
                                        "aiter_dist.quantize_per_token_fp8"):
        aiter_dist.gemm_a8w8(xq.bfloat16(), wq, xs, ws)
    with pytest.raises(ValueError, match="gemm_a8w8: xq's K 32 must equal wq's K 16"):
        aiter_dist.gemm_a8w8(xq, wq[:, :16], xs, ws)
    with pytest.raises(ValueError, match=r"gemm_a8w8: x_scale must have shape \(4, 1\)"):
        aiter_dist.gemm_a8w8(xq, wq, xs.view(4), ws)
    with pytest.raises(ValueError, match=r"gemm_a8w8: w_scale must have shape \(1, 3\) .* got "
                                         r"\(3, 1\)"):
        aiter_dist.gemm_a8w8(xq, wq, xs, ws.t())
    with pytest.raises(TypeError, match="gemm_a8w8: x_scale has dtype torch.bfloat16"):
        aiter_dist.gemm_a8w8(xq, wq, xs.bfloat16(), ws)
    with pytest.raises(ValueError, match="gemm_a8w8: w_scale is on meta but xq is on cpu"):
        aiter_dist.gemm_a8w8(xq, wq, xs, ws.to("meta"))
    with pytest.raises(TypeError, match="gemm_a8w8: dtype must be one of"):
        aiter_dist.gemm_a8w8(xq, wq, xs, ws, dtype=torch.int8)
    bq, bw, bxs, bws = _fp8_blocks(4, 130, 300)
    with pytest.raises(ValueError, match=r"gemm_a8w8_blockscale: w_scale must have shape "
                                         r"\(2, 3\) .* make it with "
                                         r"aiter_dist.quantize_per_block_fp8"):
        aiter_dist.gemm_a8w8_blockscale(bq, bw, bxs, bws[:, :2])
    with pytest.raises(TypeError, match="gemm_a8w8_blockscale: wq has dtype torch.float32"):
        aiter_dist.gemm_a8w8_blockscale(bq, bw.float(), bxs, bws)
    with pytest.raises(ValueError, match="gemm_a8w8_blockscale: blockwise fp8 needs block_k=128"):
        Q.gemm_a8w8_blockscale_fwd(bq, bw, bxs, bws, config=G.GemmConfig(16, 16, 64))


# ----------------------------------------------------------------------------- GPU tier

def _table_configs():
    """(layout, kind, config, tma) of every table entry (run on the TMA path, as the table's
    configs are) and of the built-in defaults of both paths."""
    cuda = torch.device("cuda")
    seen = {}
    for key, entry in TUNED.items():
        layout, kind, _ = key.split(" ")
        cfg = entry["config"] or G.default_config(kind, 4096, 4096, 4096, cuda, True)
        seen[(layout, kind, tuple(cfg), True)] = None
    for kind in ("bf16", "fp16", "fp32", "fp8", "fp8-block"):
        for tma in (True, False):
            seen[("nt", kind, tuple(G.default_config(kind, 4096, 4096, 4096, cuda, tma)),
                  tma)] = None
    return list(seen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 4096, 4096), ((2, 1000), 1000, 999),
                                   (2048, 14336, 4096)], ids=str)
def test_linear_gpu(shape, dtype):
    torch.manual_seed(0)
    lead, n, k = shape
    lead = lead if isinstance(lead, tuple) else (lead,)
    dev = "cuda"
    x = torch.randn(*lead, k, device=dev).to(dtype)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    aligned = k % 8 == 0 and n % 8 == 0
    hopper = torch.cuda.get_device_capability()[0] == 9
    _check_linear(x, w, b, floor16=3e-2, path="triton-tma" if aligned and hopper else "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("layout,kind,config,tma", _table_configs(), ids=str)
def test_every_table_config_gpu(layout, kind, config, tma):
    torch.manual_seed(0)
    M, N, K = 2000, 1536, 1280  # several tiles and K steps of every config, partial row tiles
    config = G.GemmConfig(*config)
    dev = "cuda"
    hopper = torch.cuda.get_device_capability()[0] == 9
    path = "triton-tma" if tma and hopper else "triton"
    if kind.startswith("fp8"):
        if kind == "fp8":
            xq, wq, xs, ws = (t.to(dev) for t in _fp8_rowwise(M, N, K))
            out = Q.gemm_a8w8_fwd(xq, wq, xs, ws, config=config, tma=tma, backend="triton")
            ref = Q.gemm_a8w8_ref(xq, wq, xs, ws, None, torch.float64)
            assert aiter_dist.last_path("gemm_a8w8") == path
        else:
            xq, wq, xs, ws = (t.to(dev) for t in _fp8_blocks(M, N, K))
            out = Q.gemm_a8w8_blockscale_fwd(xq, wq, xs, ws, config=config, tma=tma,
                                             backend="triton")
            ref = Q.gemm_a8w8_blockscale_ref(xq, wq, xs, ws, torch.float64)
            assert aiter_dist.last_path("gemm_a8w8_blockscale") == path
        assert_close_to_ref(f"{kind} {config}", out, ref, ref.to(out.dtype))
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
    a = torch.randn(M, K, device=dev) if layout[0] == "n" else torch.randn(K, M, device=dev).t()
    b = torch.randn(N, K, device=dev).t() if layout[1] == "t" else torch.randn(K, N, device=dev)
    a, b = a.to(dtype), (b / K ** 0.5).to(dtype)
    out = G.matmul(a, b, config=config, tma=tma)
    assert aiter_dist.last_path("matmul") == path
    assert_close_to_ref(f"{layout} {kind} {config}", out, a.double() @ b.double(), a @ b)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (1000, 1000, 1000), (16, 4096, 4096)],
                         ids=str)
def test_fp8_gemms_gpu(shape):
    dev = "cuda"
    xq, wq, xs, ws = (t.to(dev) for t in _fp8_rowwise(*shape))
    bias = torch.randn(shape[1], device=dev)
    for backend in ("triton", "vendor"):
        out = Q.gemm_a8w8_fwd(xq, wq, xs, ws, bias, backend=backend)
        ref = Q.gemm_a8w8_ref(xq, wq, xs, ws, bias, torch.float64)
        assert_close_to_ref(f"gemm_a8w8 {shape} {backend}", out, ref, ref.to(out.dtype))
    xq, wq, xs, ws = (t.to(dev) for t in _fp8_blocks(*shape))
    out = aiter_dist.gemm_a8w8_blockscale(xq, wq, xs, ws)
    ref = Q.gemm_a8w8_blockscale_ref(xq, wq, xs, ws, torch.float64)
    assert_close_to_ref(f"blockscale {shape}", out, ref, ref.to(out.dtype))
    hopper = torch.cuda.get_device_capability()[0] == 9
    if shape[2] % 16 == 0 and hopper:
        assert aiter_dist.last_path("gemm_a8w8_blockscale") in ("triton-tma", "torch._scaled_mm")


@pytest.mark.gpu
def test_tgemm_dispatch_gpu():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    backends = G.linear_backends("tgemm.mm", 4096, 1024, 4096, torch.bfloat16, x.device, "auto",
                                 "vendor")
    out = aiter_dist.tgemm.mm(x, w)
    want = "torch.linear" if backends[0] == "vendor" else "triton-tma"
    assert aiter_dist.last_path("tgemm.mm") == want
    assert_close_to_ref("tgemm gpu", out, x.double() @ w.double().T, x @ w.T)
    aiter_dist.tgemm.mm(x, w, backend="triton")
    assert aiter_dist.last_path("tgemm.mm") == "triton-tma"


@pytest.mark.gpu
@pytest.mark.parametrize("device_tma", [True, False], ids=["device-desc", "host-desc"])
def test_tma_kernel_eager_and_graph_gpu(device_tma, monkeypatch):
    """The TMA kernel with descriptors built in the kernel (eager) and by the host (under CUDA
    graph capture, or with AITER_DIST_DEVICE_TMA=0): the same bits, replays included."""
    from aiter_dist.testing import capture_graph

    monkeypatch.setattr(G, "DEVICE_TMA", device_tma)
    torch.manual_seed(0)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(264, 512, device="cuda", dtype=torch.bfloat16)
    eager = aiter_dist.linear(x, w, backend="triton")
    assert aiter_dist.last_path("linear") == "triton-tma"
    graph, out = capture_graph(lambda: aiter_dist.linear(x, w, backend="triton"))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, aiter_dist.linear(x, w, backend="triton"))
    assert not torch.equal(out, eager)


def test_linear_without_gradients_skips_autograd(monkeypatch):
    """No input needs a gradient (or grad mode is off): the forward launcher alone, same values."""
    x, w, b = torch.randn(3, 5, 24), torch.randn(20, 24, requires_grad=True), torch.randn(20)
    want = aiter_dist.linear(x, w, b)
    assert want.grad_fn is not None

    def no_function(*args):
        raise AssertionError("LinearFunction.apply called without gradients")

    monkeypatch.setattr(G.LinearFunction, "apply", no_function)
    with torch.no_grad():
        got = aiter_dist.linear(x, w, b)
    assert got.grad_fn is None and got.shape == (3, 5, 20) and torch.equal(got, want.detach())
    plain = aiter_dist.linear(x, w.detach(), b)
    assert plain.grad_fn is None and torch.equal(plain, got)
