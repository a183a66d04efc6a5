"""all_reduce_add_rms_norm: the fused kernel against add_rms_norm(all_reduce(x)) and float64."""
import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.comm.fused_norm import all_reduce_add_rms_norm_ref
from aiter_dist.testing import assert_close_to_ref, run_distributed, run_gpu_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(1, 4096), (333, 4096), (64, 8192)]  # (tokens, hidden) for the multigpu tier


def _device():
    return aiter_dist.local_device()


def _close_to_unfused(out, unfused):
    """The contract for the normalized output: not bitwise the unfused kernels' (the fused and
    the standalone RMSNorm kernels reduce a row's sum of squares in different orders, which moves
    fp32 results by an ulp on GPUs), but within a few ulps of it, and within the float64
    reference's tolerance (checked beside)."""
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), unfused.float(), rtol=4 * eps, atol=4 * eps)


def _fused_vs_reference(rank, world, shapes):
    from aiter_dist.comm import get_workspace

    dev = _device()
    for dtype in DTYPES:
        for shape in shapes:
            g = torch.Generator().manual_seed(sum(shape))
            xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(world)]
            residual = torch.randn(shape, generator=g).to(dtype)
            weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
            out, res_out = aiter_dist.all_reduce_add_rms_norm(
                xs[rank].to(dev), residual.to(dev), weight.to(dev), algo="one_shot")
            assert aiter_dist.last_path("all_reduce_add_rms_norm") == "one_shot"
            unfused_out, unfused_res = aiter_dist.add_rms_norm(
                aiter_dist.all_reduce(xs[rank].to(dev), algo="one_shot"), residual.to(dev),
                weight.to(dev))
            # residual_out: the same sum, rounded the same way, as the unfused composition.
            assert torch.equal(res_out, unfused_res), (dtype, shape)
            _close_to_unfused(out, unfused_out)
            ref_out, ref_res = all_reduce_add_rms_norm_ref(
                [x.double() for x in xs], residual.double(), weight.double())
            low_out, _ = all_reduce_add_rms_norm_ref(xs, residual, weight)
            assert_close_to_ref(f"out {dtype} {shape}", out.cpu(), ref_out, low_out)
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(t, out) for t in gathered), "ranks disagree"
    assert get_workspace(device=dev).signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_fused_matches_unfused_cpu(world):
    run_distributed(_fused_vs_reference, world, [(1, 8), (7, 33), (2, 5, 64)])


def _grads_and_paths(rank, world):
    torch.manual_seed(0)
    x = torch.randn(6, 20, requires_grad=True)
    residual = torch.randn(6, 20, requires_grad=True)
    weight = torch.randn(20, requires_grad=True)
    gy, gr = torch.randn(6, 20), torch.randn(6, 20)
    out, res = aiter_dist.all_reduce_add_rms_norm(x, residual, weight, algo="one_shot")
    ((out * gy).sum() + (res * gr).sum()).backward()
    x2, r2, w2 = (t.detach().clone().requires_grad_() for t in (x, residual, weight))
    o2, res2 = aiter_dist.add_rms_norm(aiter_dist.all_reduce(x2), r2, w2)
    ((o2 * gy).sum() + (res2 * gr).sum()).backward()
    for a, b in ((x.grad, x2.grad), (residual.grad, r2.grad), (weight.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    wide = torch.randn(2, 20000)
    aiter_dist.all_reduce_add_rms_norm(wide, wide, torch.ones(20000))
    assert aiter_dist.last_path("all_reduce_add_rms_norm") == "all_reduce + add_rms_norm"
    # x and residual of different dtypes follow PyTorch's promotion, like the unfused ops.
    for xd, rd in ((torch.float16, torch.float32), (torch.float32, torch.float16)):
        xm, rm = x.detach().to(xd), residual.detach().to(rd)
        out, res = aiter_dist.all_reduce_add_rms_norm(xm, rm, weight.detach(), algo="one_shot")
        pt = torch.promote_types(xd, rd)
        assert res.dtype == out.dtype == pt
        u_out, u_res = aiter_dist.add_rms_norm(aiter_dist.all_reduce(xm).to(pt), rm.to(pt),
                                               weight.detach())
        assert torch.equal(res, u_res)
        torch.testing.assert_close(out, u_out, rtol=0, atol=0 if pt == torch.float32 else 2e-3)
        xg, rg = xm.clone().requires_grad_(), rm.clone().requires_grad_()
        o, r = aiter_dist.all_reduce_add_rms_norm(xg, rg, weight.detach(), algo="one_shot")
        (o.float().sum() + r.float().sum()).backward()
        assert xg.grad.dtype == xd and rg.grad.dtype == rd
    with pytest.raises(ValueError, match="all_reduce_add_rms_norm: residual shape"):
        aiter_dist.all_reduce_add_rms_norm(x.detach(), residual.detach()[:3], weight.detach())
    return True


def test_gradients_fallback_and_bad_input_cpu():
    run_distributed(_grads_and_paths, 2)


def _rows_in_pieces(rank, world):
    """More rows than the workspace holds: the fused kernel runs on row pieces, same result."""
    from aiter_dist.comm import create_workspace

    create_workspace(nbytes=256 + 4096 * 4)  # 4096 fp32: 102 rows of 40 per piece
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(250, 40, generator=g) for _ in range(world)]
    residual, weight = torch.randn(250, 40, generator=g), torch.randn(40, generator=g)
    out, res = aiter_dist.all_reduce_add_rms_norm(xs[rank], residual, weight, algo="one_shot")
    assert aiter_dist.last_path("all_reduce_add_rms_norm") == "one_shot"
    u_out, u_res = aiter_dist.add_rms_norm(aiter_dist.all_reduce(xs[rank], algo="one_shot"),
                                           residual, weight)
    assert torch.equal(res, u_res)
    torch.testing.assert_close(out, u_out, rtol=0, atol=0)
    q, scale, _ = aiter_dist.all_reduce_add_rms_norm_fp8(xs[rank], residual, weight,
                                                         algo="one_shot")
    assert scale.shape == (250, 1) and bool((scale > 0).all())
    return True


def test_rows_larger_than_workspace_go_in_pieces():
    run_distributed(_rows_in_pieces, 2)


@pytest.mark.multigpu
def test_fused_matches_unfused_gpu():
    run_gpu_ranks(_fused_vs_reference, GPU_SHAPES)


# ----------------------------------------------------------------------------- sequence parallel

def _inputs(world, shard_rows, n, dtype, seed):
    """Every rank's partial x (world * shard_rows, n), the full residual and the weight."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(world * shard_rows, n, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(world * shard_rows, n, generator=g).to(dtype)
    weight = (1 + 0.2 * torch.randn(n, generator=g)).to(dtype)
    return xs, residual, weight


def _sequence_parallel_vs_reference(rank, world, cases):
    """reduce_scatter_add_rms_norm and rms_norm_all_gather: the fused kernel against the unfused
    composition (residual_out bitwise) and against float64."""
    from aiter_dist.comm import get_workspace
    from aiter_dist.comm.fused_norm import (reduce_scatter_add_rms_norm_ref,
                                            rms_norm_all_gather_ref)

    dev = _device()
    for dtype in DTYPES:
        for m, n in cases:
            xs, residual, weight = _inputs(world, m, n, dtype, 31 * m + n)
            shard = residual.chunk(world)[rank]
            out, res = aiter_dist.reduce_scatter_add_rms_norm(
                xs[rank].to(dev), shard.to(dev), weight.to(dev), algo="one_shot")
            assert aiter_dist.last_path("reduce_scatter_add_rms_norm") == "one_shot"
            assert out.shape == res.shape == (m, n)
            u_out, u_res = aiter_dist.add_rms_norm(
                aiter_dist.reduce_scatter(xs[rank].to(dev), algo="one_shot"), shard.to(dev),
                weight.to(dev))
            assert torch.equal(res, u_res), (dtype, m, n)
            ref_out, ref_res = reduce_scatter_add_rms_norm_ref(
                [x.double() for x in xs], shard.double(), weight.double(), rank)
            low_out, _ = reduce_scatter_add_rms_norm_ref(xs, shard, weight, rank)
            assert_close_to_ref(f"rs out {dtype} {m}x{n}", out.cpu(), ref_out, low_out)
            _close_to_unfused(out, u_out)

            local = xs[rank][:m]
            gathered = aiter_dist.rms_norm_all_gather(local.to(dev), weight.to(dev),
                                                      algo="one_shot")
            assert aiter_dist.last_path("rms_norm_all_gather") == "one_shot"
            assert gathered.shape == (world * m, n)
            u = aiter_dist.all_gather(aiter_dist.rms_norm(local.to(dev), weight.to(dev)),
                                      algo="one_shot")
            _close_to_unfused(gathered, u)
            ref = rms_norm_all_gather_ref([x[:m].double() for x in xs], weight.double())
            low = rms_norm_all_gather_ref([x[:m] for x in xs], weight)
            assert_close_to_ref(f"ag out {dtype} {m}x{n}", gathered.cpu(), ref, low)
            every = [torch.empty_like(gathered) for _ in range(world)]
            dist.all_gather(every, gathered)
            assert all(torch.equal(t, gathered) for t in every), "ranks disagree"
    assert get_workspace(device=dev).signal_pads_clean()
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequence_parallel_ops_cpu(world):
    run_distributed(_sequence_parallel_vs_reference, world, [(1, 8), (3, 33)])


def _sequence_parallel_grads(rank, world, algo):
    """Gradients against the unsharded computation in float64: sum over ranks of each rank's loss
    equals the loss of the full-sequence op."""
    m, n = 3, 20
    xs, residual, weight = _inputs(world, m, n, torch.float32, 7)
    g = torch.Generator().manual_seed(8)
    gys = [torch.randn(m, n, generator=g) for _ in range(world)]
    grs = [torch.randn(m, n, generator=g) for _ in range(world)]
    gfull = [torch.randn(world * m, n, generator=g) for _ in range(world)]

    # reduce_scatter_add_rms_norm, on the device the group serves (CPU ranks or GPUs)
    dev = _device()
    x = xs[rank].to(dev, copy=True).requires_grad_()
    r = residual.chunk(world)[rank].to(dev, copy=True).requires_grad_()
    w = weight.to(dev, copy=True).requires_grad_()
    out, res = aiter_dist.reduce_scatter_add_rms_norm(x, r, w, algo=algo)
    ((out * gys[rank].to(dev)).sum() + (res * grs[rank].to(dev)).sum()).backward()
    x64 = [t.double().requires_grad_() for t in xs]
    r64, w64 = residual.double().requires_grad_(), weight.double().requires_grad_()
    o64, s64 = aiter_dist.comm.fused_norm.add_rms_norm_ref(sum(x64), r64, w64)
    ((o64 * torch.cat(gys).double()).sum() + (s64 * torch.cat(grs).double()).sum()).backward()
    torch.testing.assert_close(x.grad.cpu(), x64[rank].grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.grad.cpu(), r64.grad.chunk(world)[rank].float(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(w.grad.cpu(), w64.grad.float(), rtol=1e-5, atol=1e-5)

    # rms_norm_all_gather
    x = xs[rank][:m].to(dev, copy=True).requires_grad_()
    w = weight.to(dev, copy=True).requires_grad_()
    (aiter_dist.rms_norm_all_gather(x, w, algo=algo) * gfull[rank].to(dev)).sum().backward()
    full64 = torch.cat([t[:m] for t in xs]).double().requires_grad_()
    w64 = weight.double().requires_grad_()
    (aiter_dist.kernels.rmsnorm.rms_norm_ref(full64, w64) * sum(gfull).double()).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), full64.grad.chunk(world)[rank].float(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(w.grad.cpu(), w64.grad.float(), rtol=1e-5, atol=1e-5)
    return True


@pytest.mark.parametrize("world,algo", [(2, "one_shot"), (3, "one_shot"), (2, "fallback")])
def test_sequence_parallel_gradients_cpu(world, algo):
    run_distributed(_sequence_parallel_grads, world, algo)


def _sequence_parallel_bad_input(rank, world):
    x = torch.randn(2 * world + 1, 8)
    with pytest.raises(ValueError, match=r"reduce_scatter_add_rms_norm: x.shape\[0\]=\d+ is not "
                                         r"divisible by the world size"):
        aiter_dist.reduce_scatter_add_rms_norm(x, torch.randn(2, 8), torch.ones(8))
    with pytest.raises(ValueError, match=r"residual must be this rank's shard of shape \(2, 8\)"):
        aiter_dist.reduce_scatter_add_rms_norm(torch.randn(2 * world, 8), torch.randn(4, 8),
                                               torch.ones(8))
    with pytest.raises(ValueError, match=r"rms_norm_all_gather: x must be \(tokens, \.\.\., "):
        aiter_dist.rms_norm_all_gather(torch.randn(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"rms_norm_all_gather: weight must have shape \(8,\)"):
        aiter_dist.rms_norm_all_gather(torch.randn(3, 8), torch.ones(7))
    with pytest.raises(TypeError, match="reduce_scatter_add_rms_norm: x has dtype torch.int64"):
        aiter_dist.reduce_scatter_add_rms_norm(torch.ones(2 * world, 8, dtype=torch.long),
                                               torch.randn(2, 8), torch.ones(8))
    # fp16 partials into an fp32 residual stream (autocast): promoted like the unfused ops.
    xs = torch.randn(2 * world, 8).half()
    out, res = aiter_dist.reduce_scatter_add_rms_norm(xs, torch.randn(2, 8), torch.ones(8),
                                                      algo="one_shot")
    assert out.dtype == res.dtype == torch.float32
    # Wide rows take the unfused path, visibly.
    wide = torch.randn(world, 20000)
    aiter_dist.rms_norm_all_gather(wide[:1], torch.ones(20000))
    assert aiter_dist.last_path("rms_norm_all_gather") == "rms_norm + all_gather"
    return True


def test_sequence_parallel_bad_input_cpu():
    run_distributed(_sequence_parallel_bad_input, 2)


# ----------------------------------------------------------------------------- fp8 output

def _fp8_vs_reference(rank, world, shapes, fp8_dtype):
    """out is the normalized rows quantized per row: its scale is amax / fp8_max, and
    out * scale is within half an fp8 step of the float64 result; residual_out is exact."""
    from aiter_dist.comm.fused_norm import _fp8_format

    dev = _device()
    fp8_max, min_exp = _fp8_format(fp8_dtype)
    for dtype in DTYPES:
        for shape in shapes:
            g = torch.Generator().manual_seed(sum(shape))
            xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(world)]
            residual = torch.randn(shape, generator=g).to(dtype)
            weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
            if shape[0] > 1:
                residual[0].zero_()  # an all-zero row (the sum of x's row 0 is zeroed below)
                for x in xs:
                    x[0].zero_()
            q, scale, res = aiter_dist.all_reduce_add_rms_norm_fp8(
                xs[rank].to(dev), residual.to(dev), weight.to(dev), fp8_dtype=fp8_dtype,
                algo="one_shot")
            assert aiter_dist.last_path("all_reduce_add_rms_norm_fp8") == "one_shot"
            assert q.dtype == fp8_dtype and q.shape == shape
            assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
            _, u_res = aiter_dist.all_reduce_add_rms_norm(xs[rank].to(dev), residual.to(dev),
                                                          weight.to(dev), algo="one_shot")
            assert torch.equal(res, u_res)
            y64 = aiter_dist.kernels.rmsnorm.rms_norm_ref(res.cpu().double(), weight.double())
            amax = y64.abs().amax(-1, keepdim=True)
            torch.testing.assert_close(scale.cpu().double(),
                                       (amax / fp8_max).clamp_min(1e-12), rtol=1e-5, atol=0)
            deq = q.cpu().double() * scale.cpu().double()
            # Half a step of the e4m3 grid: 2^-4 relative for normals, 2^(min_exp-4) * scale for
            # subnormals (plus slack for fp32 arithmetic near a midpoint).
            bound = (2**-4 * y64.abs() + 2.0**(min_exp - 4) * scale.cpu().double()) * 1.01 + 1e-6
            assert ((deq - y64).abs() <= bound).all(), (dtype, shape)
            # Each row's largest element maps to the format's largest value.
            qa = q.cpu().float().abs().amax(-1)
            nonzero = amax.squeeze(-1) > 0
            assert torch.equal(qa[nonzero], torch.full_like(qa[nonzero], fp8_max))
            assert (q.cpu().float()[~nonzero] == 0).all()
            every = [torch.empty_like(q.view(torch.uint8)) for _ in range(world)]
            dist.all_gather(every, q.view(torch.uint8))
            assert all(torch.equal(t, q.view(torch.uint8)) for t in every), "ranks disagree"
    return True


@pytest.mark.parametrize("world,fp8", [(2, "float8_e4m3fn"), (3, "float8_e4m3fnuz")])
def test_fp8_out_cpu(world, fp8):
    run_distributed(_fp8_vs_reference, world, [(1, 8), (5, 40)], getattr(torch, fp8))


def _fp8_grad_and_fallback(rank, world):
    x = torch.randn(4, 16, requires_grad=True)
    residual = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(16)
    q, scale, res = aiter_dist.all_reduce_add_rms_norm_fp8(x, residual, weight, algo="one_shot")
    assert not q.requires_grad and not scale.requires_grad
    (res * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 16), 3.0))
    assert torch.equal(residual.grad, torch.full((4, 16), 3.0))
    qf, sf, rf = aiter_dist.all_reduce_add_rms_norm_fp8(x.detach(), residual.detach(), weight,
                                                        algo="fallback")
    assert aiter_dist.last_path("all_reduce_add_rms_norm_fp8") == "all_reduce + add_rms_norm"
    assert torch.equal(rf, res.detach())
    torch.testing.assert_close(sf, scale, rtol=1e-6, atol=0)
    # Quantized independently, the two paths may round a value near a midpoint differently.
    assert ((qf.float() - q.float()).abs() <= 2.0**-3 * q.float().abs() + 1e-6).all()
    with pytest.raises(TypeError, match="fp8_dtype must be torch.float8_e4m3fn or"):
        aiter_dist.all_reduce_add_rms_norm_fp8(x, residual, weight, fp8_dtype=torch.float16)
    return True


def test_fp8_gradient_fallback_and_bad_input_cpu():
    run_distributed(_fp8_grad_and_fallback, 2)


@pytest.mark.multigpu
def test_sequence_parallel_ops_gpu():
    run_gpu_ranks(_sequence_parallel_vs_reference, GPU_SHAPES)


@pytest.mark.multigpu
def test_sequence_parallel_gradients_gpu():
    run_gpu_ranks(_sequence_parallel_grads, "one_shot")


@pytest.mark.multigpu
def test_fp8_out_gpu():
    run_gpu_ranks(_fp8_vs_reference, [(1, 4096), (333, 8192)],
                    torch.float8_e4m3fn)
