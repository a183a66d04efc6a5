"""Launch plans (kernels/_runtime.LaunchPlan): an op's second call with inputs of one signature
(shapes, strides, dtypes, device) launches from the plan its first call left, skipping the
checks and config lookups. The plan must give the bits the full path gives, for every signature
it is keyed by, and stand aside for misaligned pointers. CPU tier: the interpreter behind the
plans (the keys and arguments are the same code); GPU tier: the compiled launchers themselves."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels import _runtime
from aiter_dist.kernels import gemm as G

CPU = pytest.param("cpu", id="cpu")
GPU = pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)


@pytest.fixture
def plan_calls(monkeypatch):
    """Counts launches from plans; the plans start empty and are emptied again after."""
    calls = []
    real = _runtime.LaunchPlan.__call__

    def counted(self, *args):
        calls.append(self)
        return real(self, *args)

    _runtime.clear_plans()
    monkeypatch.setattr(_runtime.LaunchPlan, "__call__", counted)
    yield calls
    _runtime.clear_plans()


def _rows_variants(dev, dtype, n):
    """(name, tensor) inputs of one row width: contiguous 2-D and 3-D, another row count, the
    same rows strided inside a wider buffer, and a view 2 bytes off alignment."""
    base = torch.randn(9, 2 * n, device=dev).to(dtype)
    flat = torch.randn(9 * n + 8, device=dev).to(dtype)
    return [("2d", torch.randn(7, n, device=dev).to(dtype)),
            ("3d", torch.randn(2, 3, n, device=dev).to(dtype)),
            ("rows", torch.randn(9, n, device=dev).to(dtype)),
            ("strided", base[:, :n]),  # (the shape of "rows", another row stride)
            ("one strided row", base[:1, :n]),  # (contiguous to PyTorch, strides (2n, 1))
            ("misaligned", flat[1:1 + 7 * n].view(7, n))]


def _check_plans(calls, fn, inputs, compiled, unplanned=("misaligned",)):
    """For each input: the full path (plans cleared), then twice more (the plan); equal bits.
    Misaligned inputs (and the ``unplanned`` cases) must not reach a plan. Returns how many
    calls the plans served."""
    served = 0
    for name, args in inputs:
        _runtime.clear_plans()
        fresh = fn(*args)
        before = len(calls)
        again = [fn(*args) for _ in range(2)]
        hits = len(calls) - before
        if name in unplanned:
            assert hits == 0, f"{name}: reached a plan"
        else:
            assert hits >= 2, f"{name}: the second and third calls did not launch from a plan"
            if compiled:
                assert all(p.entry is not None for p in calls[before:]), \
                    f"{name}: a plan without the compiled launcher on the GPU"
        served += hits
        for out in again:
            for a, b in zip(_flat(fresh), _flat(out)):
                assert torch.equal(a, b), f"{name}: the plan's bits differ from the full path's"
                assert a.stride() == b.stride(), f"{name}: the plan's output strides differ"
    # Every signature in one process, one after another: no plan serves another's inputs.
    fresh = []
    for _, args in inputs:
        _runtime.clear_plans()
        fresh.append(fn(*args))
    _runtime.clear_plans()
    for _ in range(2):
        for (name, args), want in zip(inputs, fresh):
            for a, b in zip(_flat(want), _flat(fn(*args))):
                assert torch.equal(a, b), f"{name}: served by another signature's plan"
    return served


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norm_plans(plan_calls, dev, dtype):
    n = 40
    w = torch.randn(n, device=dev).to(dtype)
    cases = [(name, (x,)) for name, x in _rows_variants(dev, dtype, n)]
    _check_plans(plan_calls, lambda x: aiter_dist.rms_norm(x, w, 1e-5), cases, dev == "cuda")
    fused = [(name, (x, torch.randn(x.shape, device=dev).to(dtype))) for name, x in
             _rows_variants(dev, dtype, n)]
    _check_plans(plan_calls, lambda x, r: aiter_dist.add_rms_norm(x, r, w), fused,
                 dev == "cuda")


@pytest.mark.parametrize("dev", [CPU, GPU])
def test_norm_plans_with_autograd(plan_calls, dev):
    """The forward under autograd writes rstd (a call without autograd does not): separate
    plans, side by side, and the gradients match the full path's."""
    n = 24
    x = torch.randn(6, n, device=dev)
    w = torch.randn(n, device=dev, requires_grad=True)

    def fwd_bwd(x):
        xg = x.clone().requires_grad_()
        y = aiter_dist.rms_norm(xg, w)
        dx, dw = torch.autograd.grad(y, (xg, w), torch.ones_like(y))
        return y.detach(), dx, dw

    want = fwd_bwd(x)  # the full path (the fixture emptied the plans)
    _runtime.clear_plans()
    for _ in range(2):
        aiter_dist.rms_norm(x, w.detach())  # a plan without rstd first
    for _ in range(2):
        for a, b in zip(want, fwd_bwd(x)):
            assert torch.equal(a, b)
    _check_plans(plan_calls, fwd_bwd, [("2d", (x,))], dev == "cuda")


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_norm_backward_skips_an_unwanted_dweight(plan_calls, dev, fused):
    """A weight that needs no gradient: the backward computes no dweight (one launch, no sum:
    two plans per forward+backward against three), the same dx bits; calls with and without
    dweight alternate through their own plans."""
    n = 40
    x, r = torch.randn(5, n, device=dev), torch.randn(5, n, device=dev)
    w = torch.randn(n, device=dev)

    def fwd_bwd(weight):
        xg = x.clone().requires_grad_()
        out = aiter_dist.add_rms_norm(xg, r, weight)[0] if fused else aiter_dist.rms_norm(xg, weight)
        wants = (xg, weight) if weight.requires_grad else (xg,)
        return torch.autograd.grad(out, wants, torch.ones_like(out))

    want_dx, want_dw = fwd_bwd(w.clone().requires_grad_())  # (the full paths: no plans yet)
    _runtime.clear_plans()
    want_dx_alone, = fwd_bwd(w)
    assert torch.equal(want_dx, want_dx_alone)
    fwd_bwd(w.clone().requires_grad_())  # (both backwards have plans from here on)
    for _ in range(2):
        for with_dw in (False, True, False):
            before = len(plan_calls)
            got = fwd_bwd(w.clone().requires_grad_() if with_dw else w)
            assert len(plan_calls) - before == (3 if with_dw else 2), \
                "the backward launched a dweight sum that nobody wants" if not with_dw else \
                "the forward, backward and dweight sum did not all launch from plans"
            assert torch.equal(got[0], want_dx)
            if with_dw:
                assert torch.equal(got[1], want_dw)
    from aiter_dist.kernels import rmsnorm as RN
    y, _, rstd = RN.rms_norm_fwd(x, w)
    dx, dw = RN.rms_norm_bwd(torch.ones_like(y), x, w, rstd, need_dw=False)
    assert dw is None and torch.equal(dx, RN.rms_norm_bwd(torch.ones_like(y), x, w, rstd)[0])


@pytest.mark.parametrize("dev", [CPU, GPU])
def test_wide_row_backward_without_dweight(dev):
    """Rows wider than one block take the chunked backward (column chunks, partial dweight
    rows): without dweight it writes the same dx, and with it dweight matches float64."""
    from aiter_dist.kernels import rmsnorm as RN

    n = 4100  # (past one 4096-column chunk)
    x, dy = torch.randn(3, n, device=dev), torch.randn(3, n, device=dev)
    w = torch.randn(n, device=dev)
    _, _, rstd = RN.rms_norm_fwd(x, w)
    dx, dw = RN.rms_norm_bwd(dy, x, w, rstd, max_n=64)
    dx_alone, none = RN.rms_norm_bwd(dy, x, w, rstd, max_n=64, need_dw=False)
    assert none is None and torch.equal(dx, dx_alone)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    want_dx, want_dw = torch.autograd.grad(ref, (x64, w64), dy.double())
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_plans(plan_calls, dev, dtype):
    k, n = 32, 24
    w = torch.randn(n, k, device=dev).to(dtype)
    bias = torch.randn(n, device=dev).to(dtype)
    cases = [(name, (x,)) for name, x in _rows_variants(dev, dtype, k)]
    _check_plans(plan_calls, lambda x: aiter_dist.linear(x, w, backend="triton"), cases,
                 dev == "cuda")
    _check_plans(plan_calls, lambda x: aiter_dist.linear(x, w, bias, backend="triton"), cases,
                 dev == "cuda")
    # dgrad and wgrad through the plans too (matmul keys its plans by op and layout).
    wg = w.clone().requires_grad_()

    def fwd_bwd(x):
        xg = x.clone().requires_grad_()
        y = aiter_dist.linear(xg, wg, backend="triton")
        return (y.detach(), *torch.autograd.grad(y, (xg, wg), torch.ones_like(y)))

    _check_plans(plan_calls, fwd_bwd, cases[:1], dev == "cuda")


def test_linear_plans_follow_the_dispatch_table(plan_calls, monkeypatch):
    """A plan keeps the dispatch it was made with; clear_plans() after a table change."""
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    for _ in range(2):
        aiter_dist.linear(x, w)
    assert aiter_dist.last_path("linear").startswith("triton")
    monkeypatch.setattr(G, "linear_backends", lambda *a, **k: ("vendor",) * 3)
    aiter_dist.linear(x, w)
    assert aiter_dist.last_path("linear").startswith("triton")
    _runtime.clear_plans()
    aiter_dist.linear(x, w)
    assert aiter_dist.last_path("linear") == "torch.linear"


def test_linear_plans_and_autocast():
    """A call under autocast leaves no plan that would skip the dtype check outside it."""
    _runtime.clear_plans()
    x, w = torch.randn(5, 16).bfloat16(), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert aiter_dist.linear(x, w).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="differs from weight dtype"):
        aiter_dist.linear(x, w)


def test_matmul_plans_repeat_tma_calls():
    """The tensor-descriptor kernel from a plan (the interpreter runs it): same bits."""
    _runtime.clear_plans()
    a, b = torch.randn(40, 32), torch.randn(32, 24)
    first = G.matmul(a, b, tma=True)
    assert aiter_dist.last_path("matmul") == "triton-interpreter-tma"
    for _ in range(2):
        assert torch.equal(G.matmul(a, b, tma=True), first)
    assert torch.equal(G.matmul(a, b, config=[16, 16, 16, 1, 1, 1]), G.matmul(
        a, b, config=G.GemmConfig(16, 16, 16, 1, 1, 1)))  # (a config given as a list)


@pytest.mark.gpu
def test_linear_plans_follow_module_switches_gpu(plan_calls, monkeypatch):
    """Device-side descriptors on and off (AITER_DIST_DEVICE_TMA), and TF32 on and off for
    fp32: each its own plan (none with host descriptors), each the full path's bits."""
    x, w = torch.randn(300, 512, device="cuda"), torch.randn(264, 512, device="cuda")
    for device_tma in (True, False):
        monkeypatch.setattr(G, "DEVICE_TMA", device_tma)
        for tf32 in (False, True):
            monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
            _runtime.clear_plans()
            want = aiter_dist.linear(x.bfloat16(), w.bfloat16(), backend="triton")
            want32 = aiter_dist.linear(x, w, backend="triton")
            del plan_calls[:]
            assert torch.equal(aiter_dist.linear(x.bfloat16(), w.bfloat16(), backend="triton"),
                               want)
            assert torch.equal(aiter_dist.linear(x, w, backend="triton"), want32)
            if device_tma:
                assert [p.kwargs["DEVICE_DESC"] for p in plan_calls] == [True, True]
                assert plan_calls[-1].kwargs["PRECISION"] == ("tf32" if tf32 else "ieee")
            else:  # host descriptors are encoded per call: no plan
                assert not plan_calls


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_plans(plan_calls, dev, causal):
    dtype = torch.float16 if dev == "cuda" else torch.float32

    def qkv(b, sq, sk, h, hk, d):
        return (torch.randn(b, sq, h, d, device=dev).to(dtype),
                *(torch.randn(b, sk, hk, d, device=dev).to(dtype) for _ in range(2)))

    q, k, v = qkv(2, 13, 13, 4, 2, 32)
    wide = torch.randn(2, 13, 8, 32, device=dev).to(dtype)  # heads strided inside a wider buffer
    flat = torch.randn(2 * 13 * 4 * 32 + 8, device=dev).to(dtype)
    cases = [("dense", (q, k, v)), ("gqa", qkv(1, 9, 17, 4, 1, 64)),
             ("strided heads", (wide[:, :, :4], k, v)),
             ("misaligned", (flat[1:1 + q.numel()].view(q.shape), k, v))]
    _check_plans(plan_calls, lambda q, k, v: aiter_dist.flash_attn_func(
        q, k, v, causal=causal, return_lse=True), cases, dev == "cuda")

    def fwd_bwd(q, k, v):  # the forward under autograd takes the plans too (a deterministic
        # backward: atomics would change dq's last bits between calls)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = aiter_dist.flash_attn_func(q, k, v, causal=causal, deterministic=True)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    _check_plans(plan_calls, fwd_bwd, cases[:1], dev == "cuda")
    # Another scale with the same plan: the scale is an argument, not part of the plan.
    a = aiter_dist.flash_attn_func(q, k, v, causal=causal, softmax_scale=0.3)
    _runtime.clear_plans()
    assert torch.equal(a, aiter_dist.flash_attn_func(q, k, v, causal=causal, softmax_scale=0.3))


@pytest.mark.parametrize("dev", [CPU, GPU])
def test_flash_attention_backward_plans(plan_calls, dev):
    """The backward's launches (delta, dK/dV, and dQ where deterministic) from plans, one case
    after another (no case's plan may serve the next): dK and dV bitwise the full path's, dQ
    too where it is deterministic (atomic adds on a GPU may land in another order); a
    misaligned input takes the full path."""
    from aiter_dist.kernels import flash_attn as FA

    dtype = torch.float16 if dev == "cuda" else torch.float32

    def problem(b, sq, sk, h, hk, d, q=None):
        q = torch.randn(b, sq, h, d, device=dev).to(dtype) if q is None else q
        k, v = (torch.randn(b, sk, hk, d, device=dev).to(dtype) for _ in range(2))
        out, lse = FA.flash_attn_fwd(q, k, v, 0.125, False, (-1, -1))
        return (torch.randn_like(out), q, k, v, out, lse)

    wide = torch.randn(2, 13, 8, 32, device=dev).to(dtype)  # heads strided inside a wider buffer
    dense = problem(2, 13, 13, 4, 2, 32)
    flat = torch.randn(dense[0].numel() + 8, device=dev).to(dtype)
    misaligned = (flat[1:1 + dense[0].numel()].view(dense[0].shape), *dense[1:])
    # (name, inputs, scale, causal, window, deterministic); neighbours differ in one item
    cases = [("dense", dense, 0.125, True, (-1, -1), False),
             ("deterministic", dense, 0.125, True, (-1, -1), True),
             ("full", dense, 0.125, False, (-1, -1), True),
             ("window", dense, 0.125, False, (4, 2), True),
             ("another scale", dense, 0.3, False, (4, 2), True),
             ("atomic, full", dense, 0.3, False, (-1, -1), False),
             ("gqa", problem(1, 9, 17, 4, 1, 64), 0.125, True, (-1, -1), False),
             ("strided heads", problem(2, 13, 13, 4, 2, 32, wide[:, :, :4]), 0.125, True,
              (-1, -1), False),
             ("misaligned", misaligned, 0.125, True, (-1, -1), False)]

    def bwd(args, scale, causal, window, det):
        return FA.flash_attn_bwd(*args, scale, causal, window, deterministic=det)

    _runtime.clear_plans()
    got = []
    for name, args, *how in cases:
        first = bwd(args, *how)
        before = len(plan_calls)
        again = bwd(args, *how)
        hits = plan_calls[before:]
        if name == "misaligned":
            assert not hits, "a misaligned dout reached a plan"
        else:
            assert len(hits) >= 2, f"{name}: the second backward did not launch from plans"
            if dev == "cuda":
                assert all(p.entry is not None for p in hits), f"{name}: no compiled launcher"
        got.append((first, again, aiter_dist.last_path("flash_attn_bwd")))
    for (name, args, *how), (*planned, path) in zip(cases, got):
        _runtime.clear_plans()
        want = bwd(args, *how)
        assert path == aiter_dist.last_path("flash_attn_bwd"), f"{name}: another kernel path"
        exact = how[-1] or dev == "cpu"
        for out in planned:
            for which, a, b in zip("q k v".split(), out, want):
                assert a.dtype == b.dtype and a.stride() == b.stride(), f"{name}: d{which} layout"
                if exact or which != "q":
                    assert torch.equal(a, b), f"{name}: d{which} differs from the full path's"
                else:
                    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_plans(plan_calls, dev, dtype):
    cases = [(name, (g, torch.randn(g.shape, device=dev).to(dtype)))
             for name, g in _rows_variants(dev, dtype, 40)]

    def fwd_bwd(g, u):
        g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
        y = aiter_dist.swiglu(g, u)
        return (y.detach(), *torch.autograd.grad(y, (g, u), torch.ones_like(y)))

    _check_plans(plan_calls, lambda g, u: aiter_dist.swiglu(g, u), cases, dev == "cuda")
    _check_plans(plan_calls, fwd_bwd, cases[:2], dev == "cuda")


@pytest.mark.parametrize("dev", [CPU, GPU])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_conv2d_plans(plan_calls, dev, bias):
    """3x3 convs (the direct kernel): channels_last and NCHW inputs (copied to channels_last
    on the GPU, so not planned there), strides and padding as ints or pairs."""
    dtype = torch.float16 if dev == "cuda" else torch.float32
    cl = torch.channels_last
    w = torch.randn(8, 6, 3, 3, device=dev).to(dtype).contiguous(memory_format=cl)
    b = torch.randn(8, device=dev).to(dtype) if bias else None
    x = torch.randn(2, 6, 9, 7, device=dev).to(dtype)
    flat = torch.randn(x.numel() + 8, device=dev).to(dtype)
    cases = [("channels_last", (x.contiguous(memory_format=cl), 1, 1)),
             ("pairs", (x.contiguous(memory_format=cl), (2, 1), (1, 0))),
             ("nchw", (x, 1, 1)),
             ("misaligned", (flat[1:1 + x.numel()].view(x.shape), 1, 1))]
    _check_plans(plan_calls, lambda x, s, p: aiter_dist.conv2d(x, w, b, s, p), cases,
                 dev == "cuda", unplanned=("misaligned",) + (("nchw",) if dev == "cuda" else ()))


@pytest.mark.parametrize("dev", [CPU, GPU])
def test_plans_keep_no_tensor_alive(plan_calls, dev):
    """A plan holds launch parameters, not the tensors of the call that made it (on the GPU the
    attention shape is large enough for the tensor-descriptor path)."""
    import gc
    import weakref

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shape = (2, 1024, 16, 128) if dev == "cuda" else (1, 9, 2, 16)
    tensors = {"x": torch.randn(5, 32, device=dev).to(dtype),
               "w": torch.randn(32, device=dev).to(dtype),
               "lw": torch.randn(8, 32, device=dev).to(dtype),
               **{n: torch.randn(shape, device=dev).to(dtype) for n in "qkv"}}
    for _ in range(2):
        aiter_dist.rms_norm(tensors["x"], tensors["w"])
        aiter_dist.linear(tensors["x"], tensors["lw"], backend="triton")
        aiter_dist.flash_attn_func(tensors["q"], tensors["k"], tensors["v"], causal=True)
    if dev == "cuda":
        assert aiter_dist.last_path("flash_attn") == "triton-tma"
    assert plan_calls, "no plan served the second calls"
    refs = {n: weakref.ref(t) for n, t in tensors.items()}
    del tensors
    gc.collect()
    assert [n for n, r in refs.items() if r() is not None] == []


# ----------------------------------------------------------------------------- collectives

def _collective_plans(rank, world, ops):
    """Each case three times: the first call may meet the previous case's plan (which must not
    serve it), the plan made then serves the next two (its compiled launcher on a GPU); all
    three give the bits of a call with no plans at all, and the path is recorded. Misaligned
    inputs and the workspace tensor itself take the full path; a planned call meets a peer's
    full-path call of the same message (after a composed call); plans end with
    release_workspaces(); a rank whose planned call meets a peer's different message raises
    like the full path."""
    import gc
    import weakref

    from aiter_dist.comm import (create_workspace, get_workspace, protocol, release_workspaces,
                                 workspace_tensor)

    served = []
    real = protocol.CollectivePlan.__call__

    def counted(self, *tensors):
        served.append(self)
        return real(self, *tensors)

    protocol.CollectivePlan.__call__ = counted
    dev = aiter_dist.local_device()
    gen = torch.Generator().manual_seed(rank)

    def check(name, fn, x, planned=True):
        op = name.split()[0]
        first = fn(x)
        _runtime.record_path(op, "stale")
        before = len(served)
        again = [fn(x.clone() if x.data_ptr() & 15 == 0 and planned else x) for _ in range(2)]
        hits = served[before:]
        if not planned:
            assert not hits, f"{name}: reached a plan"
        else:
            assert len(hits) == 2, f"{name}: the second and third calls did not launch from a plan"
            if dev.type == "cuda":
                assert all(p.launch.entry is not None for p in hits), \
                    f"{name}: no compiled launcher"
            assert aiter_dist.last_path(op) == hits[0].path != "stale", f"{name}: path record"
        _runtime.clear_plans()
        want = fn(x)
        for out in (first, *again):
            for a, b in zip(_bits(out), _bits(want)):
                assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), \
                    f"{name}: a planned output differs from the full path's"

    ar = aiter_dist.all_reduce
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randint(-6, 7, (5, 67), generator=gen).to(dtype).to(dev)
        # (auto: eager GPU calls go to torch.distributed, see policy.AUTO: no plan)
        for algo in ("one_shot", "two_shot", "auto"):
            check(f"all_reduce {algo} {dtype}", lambda t: ar(t, algo=algo), x,
                  planned=algo != "auto" or dev.type == "cpu")
        if "all_gather" in ops:
            for dim in (0, 1):
                check(f"all_gather dim {dim} {dtype}",
                      lambda t: aiter_dist.all_gather(t, dim=dim, algo="one_shot"), x)
            with pytest.raises(TypeError, match="dim must be an int"):  # (True == 1: no plan)
                aiter_dist.all_gather(x, dim=True, algo="one_shot")
        if "reduce_scatter" in ops:
            x2 = torch.randint(-6, 7, (world * 3, 37), generator=gen).to(dtype).to(dev)
            check(f"reduce_scatter {dtype}",
                  lambda t: aiter_dist.reduce_scatter(t, algo="one_shot"), x2)
            check(f"reduce_scatter dim 1 {dtype}",  # (a copy into rank order: no plan)
                  lambda t: aiter_dist.reduce_scatter(t, dim=1, algo="one_shot"), x2.t(), False)
        if "fused" in ops:
            w = torch.randn(67, generator=gen).to(dtype).to(dev)
            res = torch.randint(-6, 7, (5, 67), generator=gen).to(dtype).to(dev)
            check(f"all_reduce_add_rms_norm {dtype}", lambda t: aiter_dist.all_reduce_add_rms_norm(
                t, res, w, algo="one_shot"), x)
            check(f"all_reduce_add_rms_norm_fp8 {dtype}",
                  lambda t: aiter_dist.all_reduce_add_rms_norm_fp8(t, res, w, algo="one_shot"), x)
            check(f"all_reduce_add_rms_norm strided {dtype}",  # (x copied: no plan)
                  lambda t: aiter_dist.all_reduce_add_rms_norm(t, res, w, algo="one_shot"),
                  torch.cat([x, x], 1)[:, :67], False)
            xs = torch.randint(-6, 7, (world * 3, 67), generator=gen).to(dtype).to(dev)
            check(f"reduce_scatter_add_rms_norm {dtype}",
                  lambda t: aiter_dist.reduce_scatter_add_rms_norm(t, res[:3], w, algo="one_shot"),
                  xs)
            check(f"rms_norm_all_gather {dtype}",
                  lambda t: aiter_dist.rms_norm_all_gather(t, w, algo="one_shot"), res[:3])
    flat = torch.randint(-6, 7, (5 * 67 + 8,), generator=gen).float().to(dev)
    check("all_reduce misaligned", lambda t: ar(t, algo="one_shot"),
          flat[1:1 + 5 * 67].view(5, 67), False)
    ws_x = workspace_tensor((5, 67), torch.float32, device=dev)
    ws_x.copy_(flat[:5 * 67].view(5, 67))
    x = ws_x.clone()
    check("all_reduce plain", lambda t: ar(t, algo="one_shot"), x)  # (a plan for ws_x's shape)
    want = ar(x, algo="one_shot")
    # Rank 0's call takes its plan, rank 1's the full path (a misaligned copy), after a call
    # composed from torch.distributed: the ranks' counts and headers must still agree.
    assert torch.equal(ar(x, algo="fallback"), want)
    mis = flat.clone()[1:1 + x.numel()].view(x.shape)
    mis.copy_(x)
    before = len(served)
    assert torch.equal(ar(x if rank == 0 else mis, algo="one_shot"), want)
    assert len(served) - before == (1 if rank == 0 else 0)
    before = len(served)
    ws_x.copy_(x)
    assert torch.equal(ar(ws_x, algo="one_shot"), want)
    assert len(served) == before, "the workspace tensor itself reached a plan"
    # A workspace re-created at another size: no plan keeps the old one alive.
    old = weakref.ref(get_workspace(device=dev))
    create_workspace(device=dev, nbytes=old().nbytes + 4096)
    del ws_x
    served.clear()  # (the plans this test counted)
    gc.collect()
    assert old() is None, "the replaced workspace is still referenced"
    assert torch.equal(ar(x, algo="one_shot"), want)
    release_workspaces()
    before = len(served)
    assert torch.equal(ar(x, algo="one_shot"), want)
    assert len(served) == before, "a plan outlived release_workspaces()"
    assert torch.equal(ar(x, algo="one_shot"), want) and len(served) == before + 1
    # Rank 1 passes the same bytes in another shape: its call takes the full path, rank 0's the
    # plan; the kernels compare headers and both ranks raise.
    with pytest.raises(RuntimeError, match="different message|stopped this collective"):
        ar(x if rank == 0 else x.view(67, 5), algo="one_shot")
        if dev.type == "cuda":
            torch.cuda.synchronize()
            aiter_dist.check_errors()
    release_workspaces()
    return len(served)


OPS = ("all_reduce", "all_gather", "reduce_scatter", "fused")


def _bits(out):
    """An op's outputs as tensors whose equality is bitwise (fp8 as bytes)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t
            for t in outs if t is not None]


def test_collective_plans_cpu():
    from aiter_dist.testing import run_distributed

    assert all(n > 0 for n in run_distributed(_collective_plans, 2, OPS))


@pytest.mark.multigpu
def test_collective_plans_gpu():
    from aiter_dist.testing import run_gpu_ranks

    assert all(n > 0 for n in run_gpu_ranks(_collective_plans, OPS, world=2))
