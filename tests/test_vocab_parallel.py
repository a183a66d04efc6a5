"""vocab_parallel_cross_entropy on 2 and 3 CPU ranks: the loss against the unsharded float64
loss, the same bits on every rank, each shard's gradient against the matching slice of the full
gradient, ignored targets, bad input raising on every rank, torch.compile and opcheck."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import aiter_dist
from aiter_dist.comm import vocab_parallel as VP
from aiter_dist.testing import (OPCHECK, assert_close_to_ref, assert_compiled_matches_eager,
                                run_distributed)

C = 13  # classes per rank: V = 13 * world
LEAD = (2, 5)  # the logits' leading dims (10 rows)


def _full(world, dtype, seed):
    """The same full logits and targets on every rank (some targets ignored)."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*LEAD, C * world, generator=g)).to(dtype)
    target = torch.randint(0, C * world, LEAD, generator=g)
    target[0, 1] = target[1, 3] = -100
    return logits, target


def _loss_and_grad(fn, logits, target, reduction, grad):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, reduction)
    (dx,) = torch.autograd.grad(loss, x, grad.to(loss.dtype))
    return loss, dx


def _check_rank(rank, world, dtype, reduction, seed):
    full, target = _full(world, dtype, seed)
    shard = full[..., rank * C:(rank + 1) * C]
    grad = torch.randn(LEAD if reduction == "none" else (),
                       generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ours = _loss_and_grad(lambda x, t, r: aiter_dist.vocab_parallel_cross_entropy(
        x, t, reduction=r), shard, target, reduction, grad)
    assert aiter_dist.last_path("vocab_parallel_cross_entropy") == "triton-interpreter"

    def ref(x, t, r):
        return F.cross_entropy(x.flatten(0, -2), t.flatten(), reduction=r).view(
            t.shape if r == "none" else ())

    ref64 = _loss_and_grad(ref, full.double(), target, reduction, grad)
    low = _loss_and_grad(ref, full, target, reduction, grad)
    name = f"vp rank {rank}/{world} {dtype} {reduction}"
    sl = slice(rank * C, (rank + 1) * C)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert_close_to_ref(f"{name} loss", ours[0], ref64[0], low[0])
    assert_close_to_ref(f"{name} grad", ours[1], ref64[1][..., sl], low[1][..., sl])
    return ours[0].float().view(-1).view(torch.int32).tolist()  # the loss bits


def _correct(rank, world):
    bits = {}
    for i, (dtype, reduction) in enumerate([(torch.float32, "mean"), (torch.float32, "none"),
                                            (torch.bfloat16, "sum"), (torch.float16, "mean")]):
        bits[(str(dtype), reduction)] = _check_rank(rank, world, dtype, reduction, 10 + i)
    # All targets ignored: mean is NaN, as in PyTorch; the gradient 0.
    x = torch.randn(3, C, requires_grad=True)
    loss = aiter_dist.vocab_parallel_cross_entropy(x, torch.full((3,), -100))
    (dx,) = torch.autograd.grad(loss, x)
    assert torch.isnan(loss) and torch.equal(dx, torch.zeros_like(dx))
    # A group of one is plain cross-entropy, bit for bit with our single-device op.
    solo = [dist.new_group([r]) for r in range(world)][rank]
    full, target = _full(1, torch.float32, 3)
    one = aiter_dist.vocab_parallel_cross_entropy(full, target, group=solo, reduction="none")
    torch.testing.assert_close(one, aiter_dist.cross_entropy(full.flatten(0, 1), target.flatten(),
                                                             reduction="none").view(LEAD),
                               rtol=1e-6, atol=1e-6)
    return bits


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_unsharded_and_ranks_agree(world):
    bits = run_distributed(_correct, world, timeout=300)
    for b in bits[1:]:
        assert b == bits[0]  # every rank holds the same loss, bit for bit


def _bad_input(rank, world):
    torch.manual_seed(0)
    target = torch.randint(0, C * world, (7,))
    x = torch.randn(7, C)
    errors = []

    def expect(exc, pattern, fn):
        with pytest.raises(exc, match=pattern):
            fn()
        errors.append(pattern)

    # Local mistakes: every rank raises before any communication.
    expect(ValueError, r"target shape \(6,\) must be the logits' leading dims \(7,\)",
           lambda: aiter_dist.vocab_parallel_cross_entropy(x, target[:6]))
    expect(TypeError, "class probabilities are not supported",
           lambda: aiter_dist.vocab_parallel_cross_entropy(x, x))
    # Shards of different sizes: the gathered description tells every rank.
    xs = torch.randn(7, C + rank)
    expect(ValueError, r"vocabulary shards of different sizes \(\[13, 14(, 15)?\] classes",
           lambda: aiter_dist.vocab_parallel_cross_entropy(xs, target))
    # Targets that differ between ranks.
    tr = target.clone()
    tr[4] = (tr[4] + rank) % (C * world)
    expect(ValueError, "target differs between ranks at row 4",
           lambda: aiter_dist.vocab_parallel_cross_entropy(x, tr))
    # A target outside the whole vocabulary.
    tb = target.clone()
    tb[2] = C * world
    expect(ValueError, rf"target\[2\] \(flattened\) is {C * world}, outside \[0, {C * world}\)",
           lambda: aiter_dist.vocab_parallel_cross_entropy(x, tb))
    # The kernels themselves (what a GPU runs, without the CPU checks): NaN rows, no reads
    # outside the shard, and every rank still agrees.
    loss, _ = VP.vocab_parallel_cross_entropy_fwd(x, tb, check=False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5, 6]]).all()
    loss, _ = VP.vocab_parallel_cross_entropy_fwd(x, tr, check=False)
    assert torch.isnan(loss[4]) and torch.isfinite(loss[[0, 1, 2, 3, 5, 6]]).all()
    # Row counts that differ: the all-gather's own agreement check raises on every rank (last:
    # it leaves the group's workspace unusable).
    xr = torch.randn(7 + rank, C)
    with pytest.raises(RuntimeError, match="all_gather"):
        aiter_dist.vocab_parallel_cross_entropy(xr, torch.zeros(7 + rank, dtype=torch.long))
    return len(errors)


def test_vocab_parallel_bad_input_raises_on_every_rank():
    assert run_distributed(_bad_input, 3, timeout=300) == [5, 5, 5]


def _compiles(rank, world):
    full, target = _full(world, torch.float32, 7)
    shard = full[..., rank * C:(rank + 1) * C].contiguous()
    assert_compiled_matches_eager(
        lambda x: aiter_dist.vocab_parallel_cross_entropy(x * 2, target, reduction="none").sin(),
        (shard,))
    name = dist.group.WORLD.group_name
    torch.library.opcheck(torch.ops.aiter_dist.vocab_parallel_cross_entropy.default,
                          (shard.flatten(0, 1), target.flatten(), name, -100),
                          test_utils=OPCHECK)
    return True


def test_vocab_parallel_compiles():
    run_distributed(_compiles, 2, timeout=300)
