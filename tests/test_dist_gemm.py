"""all_gather_gemm and gemm_reduce_scatter on CPU ranks (the /dev/shm workspace, barriers through
the interpreter): forward and every gradient against float64 compositions of plain tensors, both
paths, pieces, bad input, ranks that disagree, torch.compile."""
import pytest
import torch

import aiter_dist
from aiter_dist.testing import (OPCHECK, assert_close_to_ref, assert_compiled_matches_eager,
                                run_distributed, run_gpu_ranks)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- the models
#
# The same computation written with plain tensors, run in float64 (the reference) and in the
# test's dtype (PyTorch's own error, which sets the bound). Every rank builds every rank's
# inputs from seeds, so it can compute the global loss's gradients for itself.

def _ag_model(xs, ws, bs, gs, rank):
    """Rank r: out_r = cat(xs) @ ws[r].T + bs[r]; loss = sum_r <out_r, gs[r]>. Returns this
    rank's out and the gradients of the loss w.r.t. its x, weight, bias."""
    biases = [b for b in bs if b is not None]
    leaves = [t.detach().clone().requires_grad_() for t in (*xs, *ws, *biases)]
    world = len(xs)
    xl, wl = leaves[:world], leaves[world:2 * world]
    bl = leaves[2 * world:] or [None] * world
    xcat = torch.cat(xl, 0)
    outs = [torch.nn.functional.linear(xcat, wl[r], bl[r]) for r in range(world)]
    sum((o.float() * g.float()).sum() for o, g in zip(outs, gs)).backward()
    return outs[rank].detach(), xl[rank].grad, wl[rank].grad, \
        (bl[rank].grad if bl[rank] is not None else None)


def _rs_model(xs, ws, b, gs, rank):
    """Rank r: out_r = chunk_r(sum_q xs[q] @ ws[q].T) + b (one bias, replicated); loss =
    sum_r <out_r, gs[r]>. Returns this rank's out and the gradients w.r.t. its x, weight and b."""
    world = len(xs)
    xl = [x.detach().clone().requires_grad_() for x in xs]
    wl = [w.detach().clone().requires_grad_() for w in ws]
    bl = b.detach().clone().requires_grad_() if b is not None else None
    total = sum(x @ w.t() for x, w in zip(xl, wl))
    outs = [c + bl if bl is not None else c for c in total.chunk(world, 0)]
    sum((o.float() * g.float()).sum() for o, g in zip(outs, gs)).backward()
    return outs[rank].detach(), xl[rank].grad, wl[rank].grad, \
        (bl.grad if bl is not None else None)


def _leaf(t, dev):
    return t.to(dev).requires_grad_()


def _cpu(*tensors):
    return tuple(t.cpu() if t is not None else None for t in tensors)


def _check_against(name, ours, xs, ws, bs, gs, rank, model, dtype):
    ref = model([t.double() for t in xs], [t.double() for t in ws], _double(bs),
                [g.double() for g in gs], rank)
    low = model(xs, ws, bs, gs, rank)
    for what, o, r64, lo in zip(("out", "dx", "dweight", "dbias"), ours, ref, low):
        if r64 is None:
            assert o is None, f"{name}: {what} should be None"
            continue
        assert o.dtype == dtype, (name, what, o.dtype)
        assert_close_to_ref(f"{name} {what}", o, r64, lo)


def _double(bs):
    if isinstance(bs, list):
        return [b.double() if b is not None else None for b in bs]
    return bs.double() if bs is not None else None


def _run_ag(rank, world, dtype, lead, m_dim, K, n, bias, algo, seed):
    """One all_gather_gemm call with autograd on this rank, against the models."""
    xs = [_randn((*lead, K) if lead else (m_dim, K), seed + r, dtype) for r in range(world)]
    ws = [_randn((n, K), seed + 100 + r, dtype) for r in range(world)]
    bs = [_randn((n,), seed + 200 + r, dtype) if bias else None for r in range(world)]
    out_shape = (world * xs[0].shape[0], *xs[0].shape[1:-1], n)
    gs = [_randn(out_shape, seed + 300 + r, dtype) for r in range(world)]
    dev = aiter_dist.local_device()
    x, w = _leaf(xs[rank], dev), _leaf(ws[rank], dev)
    b = _leaf(bs[rank], dev) if bias else None
    out = aiter_dist.all_gather_gemm(x, w, b, algo=algo)
    assert out.shape == out_shape, (out.shape, out_shape)
    path = aiter_dist.last_path("all_gather_gemm")
    (out.float() * gs[rank].to(dev).float()).sum().backward()
    ours = _cpu(out.detach(), x.grad, w.grad, b.grad if bias else None)
    _check_against(f"all_gather_gemm {dtype} {algo} {out_shape}", ours, xs, ws, bs, gs, rank,
                   _ag_model, dtype)
    return path


def _run_rs(rank, world, dtype, lead, N, k_of, bias, algo, seed):
    """One gemm_reduce_scatter call (k_of(r): rank r's feature slice, may differ by rank)."""
    xs = [_randn((*lead, k_of(r)), seed + r, dtype) for r in range(world)]
    ws = [_randn((N, k_of(r)), seed + 100 + r, dtype) for r in range(world)]
    b = _randn((N,), seed + 200, dtype) if bias else None
    out_shape = (lead[0] // world, *lead[1:], N)
    gs = [_randn(out_shape, seed + 300 + r, dtype) for r in range(world)]
    dev = aiter_dist.local_device()
    x, w = _leaf(xs[rank], dev), _leaf(ws[rank], dev)
    bl = _leaf(b, dev) if bias else None
    out = aiter_dist.gemm_reduce_scatter(x, w, bl, algo=algo)
    assert out.shape == out_shape, (out.shape, out_shape)
    path = aiter_dist.last_path("gemm_reduce_scatter")
    (out.float() * gs[rank].to(dev).float()).sum().backward()
    ours = _cpu(out.detach(), x.grad, w.grad, bl.grad if bias else None)
    _check_against(f"gemm_reduce_scatter {dtype} {algo} {tuple(x.shape)}", ours, xs, ws, b, gs,
                   rank, _rs_model, dtype)
    return path


# ----------------------------------------------------------------------------- numerics

def _numerics(rank, world):
    from aiter_dist.comm import get_workspace

    seen = set()
    for i, dtype in enumerate(DTYPES):
        for algo in ("overlapped", "gated"):
            bias = (i + (algo == "gated")) % 2 == 0  # both with and without bias per path
            # odd m, K, n; a leading-dims case for each dtype
            lead = (3, 2) if i % 2 else None
            seen.add(_run_ag(rank, world, dtype, lead, 5, 7, 3 + i, bias, algo, 10 * i))
            k_of = (lambda r: 5 + r) if i != 1 else (lambda r: 7)  # uneven feature shards
            lead_rs = (world, 3) if i == 1 else (3 * world,)
            seen.add(_run_rs(rank, world, dtype, lead_rs, 5 + 2 * i, k_of, not bias, algo,
                             50 + 10 * i))
    assert seen == {"overlapped", "all_gather+gemm", "gemm+reduce_scatter"}, seen
    # Every peer's signal was consumed: the barriers are balanced.
    assert get_workspace(device=aiter_dist.local_device()).signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_forward_and_gradients_cpu(world):
    run_distributed(_numerics, world)


@pytest.mark.multigpu
def test_forward_and_gradients_gpu():
    # The side stream, events and peer copies of the GPU path (not exercised on CPU).
    run_gpu_ranks(_numerics)


def _same_bits(rank, world):
    """Results that must be the same bits on every rank, and reruns that must repeat them."""
    N, k = 6, 5
    xs = [_randn((3 * world, k), r) for r in range(world)]
    ws = [_randn((N, k), 10 + r) for r in range(world)]
    b = _randn((N,), 20).requires_grad_()
    out = aiter_dist.gemm_reduce_scatter(xs[rank], ws[rank], b, algo="overlapped")
    again = aiter_dist.gemm_reduce_scatter(xs[rank], ws[rank], b.detach(), algo="overlapped")
    assert torch.equal(out, again)  # rank-order fp32 sums: deterministic
    (out * (rank + 1)).sum().backward()
    # all_gather_gemm with the same weight everywhere: every rank computes the same output.
    w = _randn((N, k), 30)
    x = _randn((3, k), 40 + rank).requires_grad_()
    y = aiter_dist.all_gather_gemm(x, w, algo="overlapped")
    y.sum().backward()  # an expanded (stride 0) incoming gradient
    # dx = reduce_scatter(ones @ w): every rank's ones rows times the same w, summed
    torch.testing.assert_close(x.grad, (world * w.sum(0)).expand(3, k))
    return b.grad, y.detach()


def test_results_identical_across_ranks_cpu():
    results = run_distributed(_same_bits, 3)
    for db, y in results[1:]:
        assert torch.equal(db, results[0][0])  # the full bias gradient on every rank
        torch.testing.assert_close(y, results[0][1], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- paths and pieces

def _paths_and_pieces(rank, world):
    from aiter_dist.comm import create_workspace, dist_gemm

    # The size gate: algo="auto" with a threshold above the problem takes the gated path.
    x, w = _randn((5, 7), rank), _randn((3, 7), 9)
    xr = _randn((2 * world, 7), rank)
    aiter_dist.all_gather_gemm(x, w)
    assert aiter_dist.last_path("all_gather_gemm") == "overlapped"
    dist_gemm.OVERLAP_MIN_ROWS["cpu"] = 5 * world + 1
    aiter_dist.all_gather_gemm(x, w)
    assert aiter_dist.last_path("all_gather_gemm") == "all_gather+gemm"
    dist_gemm.OVERLAP_MIN_ROWS["cpu"] = 2 * world  # M = 2 * world rows: at the gate
    aiter_dist.gemm_reduce_scatter(xr, w)
    assert aiter_dist.last_path("gemm_reduce_scatter") == "overlapped"
    dist_gemm.OVERLAP_MIN_ROWS["cpu"] = 2 * world + 1
    aiter_dist.gemm_reduce_scatter(xr, w)
    assert aiter_dist.last_path("gemm_reduce_scatter") == "gemm+reduce_scatter"
    dist_gemm.OVERLAP_MIN_ROWS["cpu"] = 0

    # A 4 KB workspace: messages go in several pieces (rows of 64 fp32 = 256 B).
    create_workspace(nbytes=256 + 4096)
    _run_ag(rank, world, torch.float32, None, 37, 64, 5, True, "overlapped", 1)
    assert aiter_dist.last_path("all_gather_gemm") == "overlapped"
    path = _run_rs(rank, world, torch.float32, (13 * world,), 64, lambda r: 9, True,
                   "overlapped", 2)
    assert path == "overlapped"
    # One row larger than the workspace: the composed path, recorded.
    aiter_dist.all_gather_gemm(_randn((3, 2048), rank), _randn((2, 2048), 1), algo="overlapped")
    assert aiter_dist.last_path("all_gather_gemm") == "all_gather+gemm"
    aiter_dist.gemm_reduce_scatter(_randn((world, 4), rank), _randn((1024, 4), 1),
                                   algo="overlapped")
    assert aiter_dist.last_path("gemm_reduce_scatter") == "gemm+reduce_scatter"
    return True


def test_size_gate_and_pieces_cpu():
    run_distributed(_paths_and_pieces, 2)


def test_group_of_one_is_a_plain_gemm_cpu():
    run_distributed(_group_of_one, 1)


def _group_of_one(rank, world):
    x, w, b = _randn((2, 3, 5), 0), _randn((4, 5), 1), _randn((4,), 2)
    for fn, name in ((aiter_dist.all_gather_gemm, "all_gather_gemm"),
                     (aiter_dist.gemm_reduce_scatter, "gemm_reduce_scatter")):
        out = fn(x, w, b)
        assert aiter_dist.last_path(name) == "identity"
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))
    return True


# ----------------------------------------------------------------------------- bad input

def _bad_input(rank, world):
    from aiter_dist.comm import release_workspaces

    x, w = _randn((3, 4), rank), _randn((5, 4), 1)
    with pytest.raises(ValueError, match=r"gemm_reduce_scatter: x.shape\[0\]=3 is not divisible "
                                         r"by the world size 2; pad the tokens"):
        aiter_dist.gemm_reduce_scatter(x, w)
    with pytest.raises(TypeError, match="all_gather_gemm: input has dtype torch.int64"):
        aiter_dist.all_gather_gemm(x.long(), w)
    with pytest.raises(TypeError, match="gemm_reduce_scatter: input dtype torch.float32 differs "
                                        "from weight dtype torch.float16"):
        aiter_dist.gemm_reduce_scatter(x, w.half())
    with pytest.raises(ValueError, match="all_gather_gemm: input's last dimension 4 must equal "
                                         "weight's in_features 3"):
        aiter_dist.all_gather_gemm(x, w[:, :3])
    with pytest.raises(ValueError, match=r"all_gather_gemm: bias must have shape \(5,\)"):
        aiter_dist.all_gather_gemm(x, w, torch.ones(4))
    with pytest.raises(ValueError, match="all_gather_gemm: weight is on meta but input is on cpu"):
        aiter_dist.all_gather_gemm(x, w.to("meta"))
    with pytest.raises(ValueError, match="all_gather_gemm: x must have at least 2 dimension"):
        aiter_dist.all_gather_gemm(x[0], w)
    with pytest.raises(ValueError, match="gemm_reduce_scatter: algo must be one of auto, "
                                         "overlapped, gated"):
        aiter_dist.gemm_reduce_scatter(x[:2], w, algo="ring")
    # Ranks that disagree raise on every rank, none hangs: shapes on the overlapped path,
    # shapes on the composed path, and one rank overlapped while its peer composes.
    cases = [
        (lambda: aiter_dist.all_gather_gemm(_randn((3 + rank, 4), 0), w, algo="overlapped"),
         "all_gather_gemm: rank \\d of group .* (launched a different message|stopped this)"),
        (lambda: aiter_dist.gemm_reduce_scatter(_randn((2, 4), 0), _randn((5 + rank, 4), 0),
                                                algo="overlapped"),
         "gemm_reduce_scatter: rank \\d of group .* (launched a different message|stopped "
         "this)"),
        (lambda: aiter_dist.all_gather_gemm(_randn((3 + rank, 4), 0), w, algo="gated"),
         "all_gather_gemm: rank \\d of group .* called all_gather_gemm"),
        (lambda: aiter_dist.gemm_reduce_scatter(
            _randn((2, 4), 0), w, algo="gated" if rank else "overlapped"),
         "gemm_reduce_scatter: .*(took the custom kernel|launched a different message|stopped)"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
        release_workspaces()  # (every rank, after an error) the next call starts afresh
    out = aiter_dist.gemm_reduce_scatter(_randn((2, 4), rank), w, algo="overlapped")
    assert out.shape == (1, 5) and aiter_dist.last_path("gemm_reduce_scatter") == "overlapped"
    return True


def test_bad_input_and_disagreeing_ranks_cpu():
    run_distributed(_bad_input, 2, env={"AITER_DIST_COMM_TIMEOUT_S": "5"})


# ----------------------------------------------------------------------------- torch.compile

def _compile(rank, world):
    from torch.distributed import group

    torch.manual_seed(0)
    x = torch.randn(3, 2, 6) + rank
    w1, b1 = torch.randn(5, 6), torch.randn(5)
    w2, b2 = torch.randn(6, 5) + rank, torch.randn(6)

    def fn(x, w1, b1, w2, b2):
        h = aiter_dist.all_gather_gemm(x, w1, b1, algo="overlapped").sin()
        return aiter_dist.gemm_reduce_scatter(h, w2, b2, algo="overlapped")

    assert_compiled_matches_eager(fn, (x, w1, b1, w2, b2), loss=lambda out: (out * out).sum())
    name = group.WORLD.group_name
    x2, h2 = torch.randn(3, 6), torch.randn(4, 5)
    for op, args in (("all_gather_gemm", (x2, w1, b1, name, "overlapped")),
                     ("gemm_reduce_scatter", (h2, w2, None, name, "overlapped")),
                     ("all_gather_gemm_bwd", (torch.randn(6, 5), x2, w1, name, "overlapped",
                                              True, True, True)),
                     ("gemm_reduce_scatter_bwd", (torch.randn(2, 6), h2, w2, name, "overlapped",
                                                  True, True, False))):
        torch.library.opcheck(getattr(torch.ops.aiter_dist, op).default, args, test_utils=OPCHECK)
    return True


def test_compile_matches_eager_cpu():
    run_distributed(_compile, 2, timeout=300)
