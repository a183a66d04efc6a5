"""aiter_dist.nn.SyncBatchNorm on 2 and 3 CPU ranks against torch's BatchNorm over the whole
(concatenated) batch in float64: outputs, input gradients, per-rank weight and bias gradients
(torch.nn.SyncBatchNorm's convention: each rank's own sums, which DDP averages), running
statistics and num_batches_tracked after a few steps, eval mode, and the number of collectives
per forward and backward.

Each world size is ONE spawn running every case (process start-up dominates on 2 cores); the
ranks return their tensors and the comparisons happen here, case by case.
"""
from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.distributed as dist

import aiter_dist
from aiter_dist.testing import assert_close_to_ref, run_distributed

# name: (channels, spatial dims, per-rank batch sizes, dtype, affine, track_running_stats,
#        momentum, channels_last, steps, input needs grad, offset added to the data)
CASES = {
    "fp32": (3, (5, 7), (3, 5), torch.float32, True, True, 0.1, False, 3, True, 0.0),
    "bf16_channels_last": (5, (3, 3), (4, 2), torch.bfloat16, True, True, 0.1, True, 2, True, 0.0),
    "fp16_2d_cumulative": (4, (), (3, 6), torch.float16, True, True, None, False, 3, True, 0.0),
    "fp32_plain_empty_rank": (3, (3, 5), (5, 0), torch.float32, False, False, 0.1, False, 2, True,
                              0.0),
    "fp64": (3, (2, 3), (3, 4), torch.float64, True, True, 0.3, False, 2, True, 0.0),
    # The first step shifts by the zero running mean, later ones by the running mean: an offset
    # well past the spread checks the shifted sums.
    "fp32_offset_no_input_grad": (2, (4, 3), (3, 3), torch.float32, True, True, 0.5, False, 4,
                                  False, 20.0),
    "w3_fp32_channels_last": (3, (4, 5), (2, 3, 4), torch.float32, True, True, 0.1, True, 2, True,
                              0.5),
    "w3_3d": (2, (2, 3, 2), (1, 2, 2), torch.float32, True, True, 0.1, False, 2, True, 0.0),
}
WORLD2 = [k for k in CASES if not k.startswith("w3")]
WORLD3 = [k for k in CASES if k.startswith("w3")]
EPS = 1e-5


def _gen(*key):
    # crc32, not hash(): string hashes differ between the ranks' processes and this one.
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _data(name, step, rank, grad=False):
    """This rank's input (or upstream gradient) for a step, in the case's dtype; deterministic."""
    c, spatial, sizes, dtype, *_ = CASES[name]
    offset = CASES[name][10]
    g = _gen(name, step, rank, grad)
    t = torch.randn(sizes[rank], c, *spatial, generator=g, dtype=torch.float64)
    if not grad:
        t = t * (1 + torch.arange(c, dtype=torch.float64).view(1, c, *[1] * len(spatial))) \
            + offset
    return t.to(dtype)


def _params(name):
    c = CASES[name][0]
    g = _gen(name, "params")
    return 1 + 0.5 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g)


def _eval_input(name, rank):
    c, spatial, sizes, dtype, *_ = CASES[name]
    return (torch.randn(2, c, *spatial, generator=_gen(name, "eval", rank), dtype=torch.float64)
            + 0.2).to(dtype)


# ----------------------------------------------------------------------------- ranks

def _run_case(name, rank, world, counter):
    c, spatial, sizes, dtype, affine, track, momentum, cl, steps, needs_grad, _ = CASES[name]
    bn = aiter_dist.nn.SyncBatchNorm(c, eps=EPS, momentum=momentum, affine=affine,
                                     track_running_stats=track,
                                     dtype=torch.float64 if dtype == torch.float64 else None)
    if affine:
        w, b = _params(name)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    out = {"steps": [], "counts": []}
    for step in range(steps):
        x = _data(name, step, rank)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                             else torch.channels_last_3d)
        x.requires_grad_(needs_grad)
        dy = _data(name, step, rank, grad=True)
        before = counter[0]
        y = bn(x)
        fwd = counter[0] - before
        path = aiter_dist.last_path("sync_batch_norm")
        y.backward(dy)
        bwd = counter[0] - before - fwd
        out["counts"].append((fwd, bwd))
        assert y.dtype == dtype and y.shape == x.shape
        if cl:
            assert y.stride() == x.stride(), "memory format not kept"
        out["steps"].append({
            "y": y.detach(), "dx": x.grad if needs_grad else None,
            "dw": bn.weight.grad.clone() if affine else None,
            "db": bn.bias.grad.clone() if affine else None, "path": path,
            "ar_path": aiter_dist.last_path("all_reduce")})
        if affine:
            bn.weight.grad = bn.bias.grad = None
    out["running"] = ((bn.running_mean.clone(), bn.running_var.clone(),
                       int(bn.num_batches_tracked)) if track else None)
    bn.eval()
    before = counter[0]
    with torch.no_grad():
        out["eval"] = bn(_eval_input(name, rank))
    out["eval_collectives"] = counter[0] - before
    out["eval_path"] = aiter_dist.last_path("sync_batch_norm")
    return out


def _count_collectives(counter):
    """Wrap the all-reduce SyncBatchNorm calls (and torch.distributed's, for float64) so every
    collective it issues is counted."""
    from aiter_dist.nn import batchnorm

    inner = batchnorm._all_reduce_stats

    def counted(t, group):
        counter[0] += 1
        return inner(t, group)

    batchnorm._all_reduce_stats = counted


def _ranks(rank, world, names):
    counter = [0]
    _count_collectives(counter)
    results = {name: _run_case(name, rank, world, counter) for name in names}
    if world == 3:
        # A group of one rank per rank: plain BatchNorm, no collective.
        groups = [dist.new_group([r]) for r in range(world)]
        bn = aiter_dist.nn.SyncBatchNorm(3, process_group=groups[rank])
        x = _data("w3_fp32_channels_last", 0, rank)
        before = counter[0]
        results["one_rank_group"] = (x, bn(x).detach(), counter[0] - before,
                                     aiter_dist.last_path("sync_batch_norm"))
    return results


@functools.lru_cache(maxsize=None)
def _results(world):
    return run_distributed(_ranks, world, tuple(WORLD2 if world == 2 else WORLD3))


# ----------------------------------------------------------------------------- references

def _bn_class(ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[ndim]


def _reference(name, world, dtype_run):
    """torch BatchNorm on the concatenated batch in ``dtype_run`` (float64: the reference; the
    case's dtype: PyTorch's own error for the bound). Per step: y, dx split by rank, per-rank
    dweight and dbias, then the running buffers and each rank's eval output."""
    c, spatial, sizes, dtype, affine, track, momentum, cl, steps, needs_grad, _ = CASES[name]
    bn = _bn_class(2 + len(spatial))(c, eps=EPS, momentum=momentum, affine=affine,
                                     track_running_stats=track,
                                     dtype=torch.float64 if dtype_run == torch.float64
                                     else torch.float32)
    if affine:
        w, b = _params(name)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    dims = [0, *range(2, 2 + len(spatial))]
    out = []
    for step in range(steps):
        xs = [_data(name, step, r) for r in range(world)]
        dys = [_data(name, step, r, grad=True) for r in range(world)]
        x = torch.cat(xs).to(dtype_run).requires_grad_()
        dy = torch.cat(dys).to(dtype_run)
        y = bn(x)
        y.backward(dy)
        x64 = x.detach().double()
        mean = x64.mean(dims, keepdim=True)
        xhat = (x64 - mean) / torch.sqrt(x64.var(dims, unbiased=False, keepdim=True) + EPS)
        dy64 = dy.double()
        split = list(sizes)
        out.append({"y": y.detach().split(split), "dx": x.grad.split(split),
                    "dw": [(d * h).sum(dims) for d, h in zip(dy64.split(split),
                                                            xhat.split(split))],
                    "db": [d.sum(dims) for d in dy64.split(split)]})
    running = (bn.running_mean, bn.running_var, int(bn.num_batches_tracked)) if track else None
    bn.eval()
    with torch.no_grad():
        evals = [bn(_eval_input(name, r).to(dtype_run)) for r in range(world)]
    return out, running, evals


def _world(name):
    return len(CASES[name][2])


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(CASES))
def test_matches_batchnorm_over_the_whole_batch(name):
    world = _world(name)
    ranks = _results(world)
    c, spatial, sizes, dtype, affine, track, momentum, cl, steps, needs_grad, _ = CASES[name]
    ref, ref_running, ref_eval = _reference(name, world, torch.float64)
    tor, _, tor_eval = _reference(name, world, dtype)
    for step in range(steps):
        for r in range(world):
            got = ranks[r][name]["steps"][step]
            tag = f"{name} step {step} rank {r}"
            assert_close_to_ref(f"{tag} y", got["y"], ref[step]["y"][r], tor[step]["y"][r])
            if needs_grad:
                assert_close_to_ref(f"{tag} dx", got["dx"], ref[step]["dx"][r],
                                    tor[step]["dx"][r])
            if affine:
                # fp32 sums of the rank's own rows (torch.nn.SyncBatchNorm's per-rank grads).
                fl = 1e-9 if dtype == torch.float64 else 2e-5
                assert_close_to_ref(f"{tag} dweight", got["dw"], ref[step]["dw"][r], floor=fl)
                assert_close_to_ref(f"{tag} dbias", got["db"], ref[step]["db"][r], floor=fl)
        if affine:
            # The per-rank parts add up to the whole batch's gradient.
            total = sum(ranks[r][name]["steps"][step]["dw"].double() for r in range(world))
            assert_close_to_ref(f"{name} summed dweight", total, sum(ref[step]["dw"]),
                                floor=1e-9 if dtype == torch.float64 else 2e-5)
    if track:
        for r in range(world):
            rm, rv, nb = ranks[r][name]["running"]
            fl = 1e-9 if dtype == torch.float64 else 2e-5
            assert_close_to_ref(f"{name} rank {r} running_mean", rm, ref_running[0], floor=fl)
            assert_close_to_ref(f"{name} rank {r} running_var", rv, ref_running[1], floor=fl)
            assert nb == ref_running[2] == steps
    for r in range(world):
        assert_close_to_ref(f"{name} rank {r} eval", ranks[r][name]["eval"], ref_eval[r],
                            tor_eval[r])


@pytest.mark.parametrize("name", list(CASES))
def test_one_collective_each_way_and_paths(name):
    world = _world(name)
    res = [_results(world)[r][name] for r in range(world)]
    needs_grad, dtype = CASES[name][9], CASES[name][3]
    for r in range(world):
        # One all-reduce per forward; one per backward when the input needs a gradient (the
        # weight and bias gradients are local sums).
        assert res[r]["counts"] == [(1, int(needs_grad))] * CASES[name][8], res[r]["counts"]
        # Eval mode normalizes with the running statistics (or, untracked, the rank's own batch,
        # as torch's): no collective.
        assert res[r]["eval_collectives"] == 0 and res[r]["eval_path"] == "local"
        for s in res[r]["steps"]:
            if dtype == torch.float64:
                assert s["path"] == "torch.distributed"
            else:
                # The stats vectors are small: aiter_dist's one-shot kernel serves them on CPU.
                assert s["path"] == "sync:one_shot" and s["ar_path"] == "one_shot"


def test_group_of_one_is_batchnorm():
    x, y, collectives, path = _results(3)[1]["one_rank_group"]
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True, eps=EPS)
    assert collectives == 0 and path == "local"
    assert_close_to_ref("group of one", y, ref)


def test_no_process_group_is_batchnorm():
    # Outside torch.distributed (a plain process) the layer is BatchNorm2d, buffers included.
    torch.manual_seed(0)
    ours = aiter_dist.nn.SyncBatchNorm(4, momentum=None)
    ref = torch.nn.BatchNorm2d(4, momentum=None).double()
    for _ in range(2):
        x = torch.randn(3, 4, 5, 3) * 2 + 1
        xr = x.double().requires_grad_()
        xo = x.clone().requires_grad_()
        assert_close_to_ref("y", ours(xo), ref(xr))
        assert aiter_dist.last_path("sync_batch_norm") == "local"
    assert_close_to_ref("running_var", ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 2


def test_state_dict_and_convert_match_torch():
    # Same buffers and parameters as torch.nn.SyncBatchNorm: checkpoints load either way.
    ours = aiter_dist.nn.SyncBatchNorm(6)
    theirs = torch.nn.SyncBatchNorm(6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    model[1].running_mean.fill_(0.5)
    conv = aiter_dist.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(conv[1], aiter_dist.nn.SyncBatchNorm)
    assert isinstance(conv[2][0], aiter_dist.nn.SyncBatchNorm)
    assert conv[1].weight is model[1].weight and conv[1].running_mean.eq(0.5).all()


@pytest.mark.parametrize("shape,match", [
    ((4, 5, 3, 3), r"sync_batch_norm: input has 5 channels .* num_features=3"),
    ((3,), r"sync_batch_norm: input must be \(N, C, \.\.\.\) with at least 2 dimensions.*"
           r"unsqueeze"),
    ((), r"at least 2 dimensions"),
])
def test_bad_input_shapes(shape, match):
    bn = aiter_dist.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=match):
        bn(torch.randn(shape))


def test_bad_input_dtype():
    with pytest.raises(TypeError, match=r"sync_batch_norm: input has dtype torch.int64"):
        aiter_dist.nn.SyncBatchNorm(3)(torch.ones(2, 3, dtype=torch.int64))
