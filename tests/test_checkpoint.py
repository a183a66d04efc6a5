"""Checkpoints that reshard (aiter_dist.checkpoint, torch.distributed.checkpoint underneath).

Unit tier: a ColumnParallelLinear + RowParallelLinear pair with AdamW state saved by 2 CPU ranks
(gloo) loads on 1 process without a process group and on 3 ranks, every full tensor compared to
an unsharded run of the same steps; the on-disk layout (atomic commit, keep-last, stray
temporaries) and the errors. End to end: examples/train_llama.py saved at TP=2 resumes at TP=1,
TP=2 and TP=4 (and --no-aiter at 2) on the uninterrupted run's loss curve.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from aiter_dist import checkpoint as ckpt
from aiter_dist.nn import ColumnParallelLinear, RowParallelLinear
from aiter_dist.testing import run_distributed

from test_train_llama import ROOT, SCRIPT, TIMEOUT_S, TP_RTOL, _check_summary, _env, torchrun

# ----------------------------------------------------------------------------- unit: the library

IN, HID, OUT = 5, 12, 7  # HID (the sharded dim) divides by 1, 2 and 3; the others are odd
SHARD_DIM = {"up.weight": 0, "up.bias": 0, "down.weight": 1}  # everything else replicated
LR, BETAS = 0.1, (0.8, 0.9)


class _Pair(nn.Module):
    """Column-parallel up, row-parallel down, one replicated parameter; full weights from
    ``seed`` (each rank keeps its slice)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        up, down = nn.Linear(IN, HID), nn.Linear(HID, OUT)
        with torch.no_grad():
            for p in (*up.parameters(), *down.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
        self.up = ColumnParallelLinear.from_linear(up)
        self.down = RowParallelLinear.from_linear(down)
        self.scale = nn.Parameter(torch.randn(OUT, generator=g))


def _adamw(model, lr=LR, betas=BETAS):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.01)


def _slice(name, full, rank, world):
    dim = SHARD_DIM.get(name)
    return full if dim is None else full.chunk(world, dim)[rank].contiguous()


def _train_step(model, opt, step, rank, world):
    """One AdamW step with gradients that are slices of full gradients drawn from ``step``:
    sharded and unsharded runs then compute the same numbers element by element."""
    g = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        full_shape = list(p.shape)
        if name in SHARD_DIM:
            full_shape[SHARD_DIM[name]] *= world
        p.grad = _slice(name, torch.randn(full_shape, generator=g), rank, world)
    opt.step()


def _local_state(model, opt):
    """{kind/name: this rank's tensor} for every parameter and its AdamW state."""
    out = {}
    for name, p in model.named_parameters():
        out[f"param/{name}"] = p.detach().clone()
        for k, v in opt.state[p].items():
            out[f"{k}/{name}"] = v.detach().clone()
    return out


def _assemble(per_rank: list[dict]) -> dict:
    """Full tensors from every rank's slices; replicated ones must agree across ranks."""
    full = {}
    for key in per_rank[0]:
        name = key.split("/", 1)[1]
        parts = [r[key] for r in per_rank]
        if name in SHARD_DIM and parts[0].dim() > 0:
            full[key] = torch.cat(parts, SHARD_DIM[name])
        else:
            for other in parts[1:]:
                assert torch.equal(other, parts[0]), f"{key} differs across ranks"
            full[key] = parts[0]
    return full


def _assert_same(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), what
    for key in want:
        assert got[key].shape == want[key].shape, (what, key)
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs"


def _extra():
    return {"rng": torch.Generator().manual_seed(7).get_state(), "config": {"dim": [3, 5]},
            "name": "pair"}


def _reference(steps: int) -> list[dict]:
    """Full state after each of ``steps`` unsharded steps (one process, no process group)."""
    model = _Pair(seed=0)
    opt = _adamw(model)
    states = []
    for step in range(steps):
        _train_step(model, opt, step, 0, 1)
        states.append(_local_state(model, opt))
    return states


def _save_ranks(rank, world, directory):
    model = _Pair(seed=0)
    opt = _adamw(model)
    for step in range(2):
        _train_step(model, opt, step, rank, world)
    path = ckpt.save(directory, 2, model, opt, extra=_extra())
    return path, _local_state(model, opt)


def _load_ranks(rank, world, paths):
    """Load each checkpoint into a fresh model and optimizer, then train one more step."""
    out = []
    for path in paths:
        model = _Pair(seed=1)  # other weights: the load must overwrite every one
        opt = _adamw(model, lr=0.5, betas=(0.5, 0.5))
        extra = ckpt.load(path, model, opt, expect={"config": {"dim": [3, 5]}})
        loaded = _local_state(model, opt)
        hyper = (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"])
        _train_step(model, opt, extra["step"], rank, world)
        out.append((extra, hyper, loaded, _local_state(model, opt)))
    return out


def test_reshard_2_ranks_to_1_and_3(tmp_path):
    ref = _reference(3)
    saved = run_distributed(_save_ranks, 2, str(tmp_path / "a"))
    path_a = saved[0][0]
    assert [p for p, _ in saved] == [path_a] * 2 and path_a == str(tmp_path / "a" / "step00000002")
    _assert_same(_assemble([s for _, s in saved]), ref[1], "2-rank save")

    # One process, no process group: loads the 2-rank checkpoint whole, and saves one.
    assert not torch.distributed.is_initialized()
    assert ckpt.latest(tmp_path / "a") == path_a
    ((extra, hyper, loaded, stepped),) = _load_ranks(0, 1, [path_a])
    _assert_same(loaded, ref[1], "2 ranks -> 1 process")
    _assert_same(stepped, ref[2], "the step after loading")
    assert hyper == (LR, BETAS)  # the saved hyperparameters, as a tuple again
    assert extra["step"] == 2 and extra["world_size"] == 2 and extra["name"] == "pair"
    assert torch.equal(extra["rng"], _extra()["rng"])
    model = _Pair(seed=0)
    opt = _adamw(model)
    for step in range(2):
        _train_step(model, opt, step, 0, 1)
    path_b = ckpt.save(tmp_path / "b", 2, model, opt, extra=_extra())

    # Three ranks load both (saved by 2 ranks, and by one process): every slice is in place.
    per_rank = run_distributed(_load_ranks, 3, [path_a, path_b])
    for i, what in enumerate(("2 ranks -> 3", "1 process -> 3")):
        _assert_same(_assemble([r[i][2] for r in per_rank]), ref[1], what)
        _assert_same(_assemble([r[i][3] for r in per_rank]), ref[2], what + ", then a step")
        assert all(r[i][1] == (LR, BETAS) for r in per_rank)
        assert per_rank[0][i][0]["world_size"] == (2, 1)[i]


def _tiny_save(directory, step, seed=0, **kw):
    model = _Pair(seed=seed)
    opt = _adamw(model)
    _train_step(model, opt, 0, 0, 1)
    return ckpt.save(directory, step, model, opt, extra=_extra(), **kw), model, opt


def test_layout_keep_last_and_replace(tmp_path):
    for step in (1, 2, 3, 4):
        path, _, _ = _tiny_save(tmp_path, step, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step00000003", "step00000004"]  # no temporaries
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    assert ckpt.latest(tmp_path) == str(tmp_path / "step00000004")
    # Saving a step again (a run resumed from an earlier step) replaces it.
    _, model, _ = _tiny_save(tmp_path, 4, seed=5, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step00000003", "step00000004"]
    fresh = _Pair(seed=0)
    ckpt.load(tmp_path / "step00000004", fresh)
    assert torch.equal(fresh.up.weight, model.up.weight)
    assert ckpt.latest(tmp_path / "nothing-here") is None


def test_cut_save_is_ignored_then_cleaned(tmp_path, monkeypatch):
    good, _, _ = _tiny_save(tmp_path, 1)
    # A crash after every rank wrote its files but before the commit: the temporary directory
    # is complete inside (even .metadata), yet it is not a checkpoint.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the writes and the rename")
    monkeypatch.setattr(ckpt, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        _tiny_save(tmp_path, 2)
    monkeypatch.undo()
    (stray,) = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert re.fullmatch(r"step00000002\.tmp-[0-9a-f]+", stray)
    assert os.path.isfile(tmp_path / stray / ".metadata")
    # A directory that merely has a checkpoint's name but no .metadata is not one either.
    os.makedirs(tmp_path / "step00000009")
    assert ckpt.latest(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load(tmp_path / "step00000009", _Pair(seed=0))
    _tiny_save(tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == ["step00000001", "step00000003", "step00000009"]


def test_errors(tmp_path):
    path, _, _ = _tiny_save(tmp_path, 1)
    with pytest.raises(ValueError, match=r'saved with \{"config": \{"dim": \[3, 5\]\}\}, but this '
                                         r'run has \{"config": \{"dim": \[3, 6\]\}\}'):
        ckpt.load(path, _Pair(seed=0), expect={"config": {"dim": (3, 6)}})

    class Wider(_Pair):
        def __init__(self):
            super().__init__(seed=0)
            self.down = RowParallelLinear(HID, OUT + 2)
    with pytest.raises(ValueError, match=r"does not fit the model.*down\.weight: model \(9, 12\), "
                                         r"checkpoint \(7, 12\)"):
        ckpt.load(path, Wider())

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = ColumnParallelLinear(IN, HID)
    with pytest.raises(ValueError, match=r"checkpoint-only tensors \['down.bias', 'down.weight', "
                                         r"'scale'\]"):
        ckpt.load(path, Fewer())
    model = _Pair(seed=0)
    with pytest.raises(ValueError, match="extra keys \\['step'\\] are reserved"):
        ckpt.save(tmp_path, 2, model, extra={"step": 3})
    with pytest.raises(ValueError, match="extra must be tensors or JSON values"):
        ckpt.save(tmp_path, 2, model, extra={"fn": print})
    with pytest.raises(ValueError, match="optimizer holds 1 parameter"):
        ckpt.save(tmp_path, 2, model, torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0))
    assert ckpt.latest(tmp_path) == path  # the refused saves left nothing behind


def test_compiled_model_saves_under_its_own_names(tmp_path):
    model = _Pair(seed=0)
    compiled = torch.compile(model, backend="eager")
    ckpt.save(tmp_path, 1, compiled)
    fresh = _Pair(seed=1)
    ckpt.load(ckpt.latest(tmp_path), torch.compile(fresh, backend="eager"))
    assert torch.equal(fresh.down.weight, model.down.weight)
    assert torch.equal(fresh.scale, model.scale)


# ----------------------------------------------------------------------------- end to end

STEPS, SAVED_AT = 6, 4  # the resumed runs train steps 5 and 6 again


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """An uninterrupted TP=2 run that saves every 2 steps and keeps the last 2 checkpoints."""
    d = tmp_path_factory.mktemp("tp2") / "ckpt"
    r = torchrun(2, "--steps", STEPS, "--checkpoint-dir", d, "--save-every", 2, "--keep-last", 2)
    _check_summary(r, 2, True, STEPS)
    return r, d


def _rewind(src, dst, step: int):
    """A copy of checkpoint directory ``src`` as it was right after the save of ``step``."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if int(name[len("step"):len("step") + 8]) > step:
            shutil.rmtree(dst / name)
    return dst


_resumed: dict = {}


def _resume(world: int, tp2_run, tmp_path_factory):
    """Resume the TP=2 run from its step-4 checkpoint at ``world`` ranks (once per module),
    with a stray temporary directory of a later step lying beside it."""
    if world not in _resumed:
        _, src = tp2_run
        d = _rewind(src, tmp_path_factory.mktemp(f"tp{world}") / "ckpt", SAVED_AT)
        # A save cut before its commit: complete inside (it is the step-6 checkpoint), yet
        # unpublished, so it must be neither loaded nor left behind.
        shutil.copytree(src / f"step{STEPS:08d}", d / "step00000005.tmp-0badc0de")
        _resumed[world] = torchrun(world, "--steps", STEPS, "--checkpoint-dir", d, "--resume"), d
    return _resumed[world]


def test_tp2_checkpoints_on_disk(tp2_run):
    _, d = tp2_run
    assert sorted(os.listdir(d)) == ["step00000004", "step00000006"]  # keep-last 2, no temps
    assert sorted(os.listdir(d / "step00000006")) == [".metadata", "__0_0.distcp",
                                                      "__1_0.distcp"]


@pytest.mark.parametrize("world", [2, 1, 4])
def test_resume_at_any_world_size(world, tp2_run, tmp_path_factory):
    """Saved at TP=2 after 4 steps, resumed at TP=1, 2 or 4: steps 5 and 6 match the
    uninterrupted TP=2 run (bit for bit or nearly at TP=2; TP=1 and TP=4 sum in another order)."""
    full, _ = tp2_run
    r, d = _resume(world, tp2_run, tmp_path_factory)
    _check_summary(r, world, True, STEPS)
    assert r["start_step"] == SAVED_AT, r  # the stray step-5 temporary was not taken
    if world == 2:
        assert r["last_loss"] == pytest.approx(full["last_loss"], rel=1e-6, abs=0), (full, r)
    else:
        assert r["last_loss"] == pytest.approx(full["last_loss"], rel=TP_RTOL), (full, r)
        same = _resume(2, tp2_run, tmp_path_factory)[0]
        assert r["first_loss"] == pytest.approx(same["first_loss"], rel=TP_RTOL), (same, r)
    # The resumed run saved step 6 at its own size; rank 0 swept the stray temporary away.
    assert sorted(os.listdir(d)) == ["step00000004", "step00000006"]
    assert sorted(os.listdir(d / "step00000006")) == [".metadata"] + [
        f"__{rank}_0.distcp" for rank in range(world)]


def test_resume_with_another_config_is_an_error(tp2_run, tmp_path):
    _, src = tp2_run
    d = shutil.copytree(src, tmp_path / "ckpt")
    p = subprocess.run([sys.executable, str(SCRIPT), "--config", "small", "--steps", "8",
                        "--checkpoint-dir", str(d), "--resume"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode != 0, p.stdout
    msg = p.stderr.strip().splitlines()[-1]
    assert re.search(r'step00000006 was saved with \{"config": "tiny", "model_config": '
                     r'\{"dim": 64, .*but this run has \{"config": "small", "model_config": '
                     r'\{"dim": 1024, ', msg), p.stderr[-3000:]


def test_no_aiter_resume(tmp_path):
    """PyTorch's own tensor parallel (DTensor parameters) saves and resumes the same way."""
    full = torchrun(2, "--steps", STEPS, "--no-aiter", "--checkpoint-dir", tmp_path / "full",
                    "--save-every", 2)
    _check_summary(full, 2, False, STEPS)
    d = _rewind(tmp_path / "full", tmp_path / "ckpt", SAVED_AT)
    r = torchrun(2, "--steps", STEPS, "--no-aiter", "--checkpoint-dir", d, "--resume")
    _check_summary(r, 2, False, STEPS)
    assert r["start_step"] == SAVED_AT
    assert r["last_loss"] == pytest.approx(full["last_loss"], rel=1e-6, abs=0), (full, r)
