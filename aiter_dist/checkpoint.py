"""Checkpoints that reshard: save at one tensor-parallel size, resume at another.

Built on ``torch.distributed.checkpoint`` (DCP). Every tensor is saved with its place in the full,
unsharded tensor, so a checkpoint written by N ranks loads on M ranks (or in one process with no
process group) as long as the model's layers divide over M:

* a parameter of a layer whose class declares ``tp_shard_dims``
  (:class:`~aiter_dist.nn.ColumnParallelLinear`: weight and bias dim 0;
  :class:`~aiter_dist.nn.RowParallelLinear`: weight dim 1) is this rank's slice of the full
  tensor; it is saved as a ``DTensor`` sharded on that dim over the layer's group, and reloads
  as whatever slice the loading rank's layer holds;
* a parameter that is already a ``DTensor`` (PyTorch's own tensor parallelism, FSDP2) reshards
  as is; under FSDP2 a tensor-parallel layer's parameter is a ``DTensor`` over the data-parallel
  mesh whose whole is this rank's slice: saving gathers that slice over dp (one all-gather per
  tensor), loading hands each dp rank its part of it;
* every other parameter and persistent buffer is replicated: saved once, loaded on every rank;
* optimizer state is keyed by parameter name, not by index: a state tensor shaped like its
  parameter (AdamW's ``exp_avg``, ``exp_avg_sq``) is sharded like it, any other (``step``) is
  replicated; the groups' hyperparameters (lr, betas, ...) are restored by parameter name too;
* ``extra``: tensors (replicated, e.g. a data generator's state) and JSON values (step, config).

Layout, crash-safe: ``save`` writes ``<directory>/step00000040.tmp-<nonce>/`` (DCP's files: one
``__<rank>_0.distcp`` per rank and ``.metadata``), then group rank 0 renames it to
``<directory>/step00000040/`` once every rank has finished. A ``stepNNNNNNNN`` directory is thus
complete by construction; a crash mid-save leaves only a ``.tmp-`` directory, which ``latest``
ignores and the next ``save`` removes. ``keep_last`` prunes the oldest complete checkpoints.

    path = aiter_dist.checkpoint.save("ckpt", step, model, opt, extra={"seed": 0}, keep_last=2)
    path = aiter_dist.checkpoint.latest("ckpt")             # newest complete one, or None
    extra = aiter_dist.checkpoint.load(path, model, opt)    # {"step": ..., "seed": 0, ...}

Every function here is collective over ``group`` when torch.distributed is initialized: every
rank of it must call it, with the same arguments (the directory on a file system every rank
sees). Without a process group they run in the one process.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import warnings

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["save", "load", "latest"]

_STEP_DIR = re.compile(r"^step(\d{8})$")
_STRAY_DIR = re.compile(r"^step\d{8}\.(tmp|old)-[0-9a-f]+$")  # a cut save; a replaced save
_RESERVED = ("step", "world_size")  # extra keys save() fills in itself


# ----------------------------------------------------------------------------- helpers

def _group(group):
    """(group or None, rank in it, its size); (None, 0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_rank(g), dist.get_world_size(g)


def _broadcast(obj, g, world):
    """``obj`` from group rank 0 to every rank of ``g``."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(g, 0), group=g)
    return box[0]


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile's wrapper prefixes every name with "_orig_mod."; checkpoints use the model's.
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _tp_slice(t):
    """A tensor-parallel slice that FSDP2 sharded further over data parallelism (a DTensor over
    the dp mesh): gathered whole; any other tensor as is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _dp_part(tp_slice: torch.Tensor, like) -> torch.Tensor:
    """This rank's data-parallel part of ``tp_slice``, shaped and placed as ``like`` (an FSDP2
    DTensor): its local tensor, cut without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tp_slice.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def _shard_specs(model: nn.Module) -> dict:
    """{parameter name: (dim, group)} for parameters that hold one rank's slice of a full tensor,
    declared by their module's class (``tp_shard_dims``) and split over more than one rank."""
    specs = {}
    for prefix, m in model.named_modules():
        dims = getattr(type(m), "tp_shard_dims", None)
        if not dims or getattr(m, "world_size", 1) <= 1:
            continue
        for name, dim in dims.items():
            if getattr(m, name, None) is not None:
                specs[f"{prefix}.{name}" if prefix else name] = (dim, m.group)
    return specs


class _Sharder:
    """Wraps a local slice as a DTensor over its layer's group (one DeviceMesh per group)."""

    def __init__(self, specs: dict):
        self.specs, self.meshes = specs, {}

    def wrap(self, name: str, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        dim, group = self.specs[name]
        key = (id(group), t.device.type)
        if key not in self.meshes:
            self.meshes[key] = DeviceMesh.from_group(group, t.device.type)
        # Shares t's storage: DCP's load writes straight into the model's parameters.
        return DTensor.from_local(t, self.meshes[key], [Shard(dim)], run_check=False)

    def full_shape(self, name: str, p: torch.Tensor) -> tuple:
        """The full (unsharded) shape of parameter ``name``."""
        if name not in self.specs:
            return tuple(p.shape)  # replicated, or a DTensor (whose shape is the full one)
        dim, group = self.specs[name]
        shape = list(p.shape)
        shape[dim] *= dist.get_world_size(group)
        return tuple(shape)


def _optim_names(model: nn.Module, optimizer) -> tuple[list, list]:
    """The optimizer's parameters in its state_dict's index order, and their names."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    unknown = sum(id(p) not in name_of for p in params)
    if unknown:
        raise ValueError(f"aiter_dist.checkpoint: the optimizer holds {unknown} parameter(s) "
                         f"that are not in the model; optimizer state is saved by parameter "
                         f"name, so pass the model whose parameters the optimizer updates")
    return params, [name_of[id(p)] for p in params]


def _json(obj, what: str) -> str:
    def plain(v):  # tensor hyperparameters (a capturable optimizer's lr) as numbers
        if torch.is_tensor(v):
            return v.tolist()
        raise TypeError(f"{type(v).__name__} is not JSON-serializable")
    try:
        return json.dumps(obj, sort_keys=True, default=plain)
    except (TypeError, ValueError) as e:
        raise ValueError(f"aiter_dist.checkpoint: {what} must be tensors or JSON values "
                         f"(numbers, strings, lists, dicts): {e}") from None


def _step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step{step:08d}")


def _complete_steps(directory: str) -> list[int]:
    """Steps with a committed checkpoint directory, oldest first."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        # .metadata too: a directory of that name not made by save() is not taken on trust.
        if m and os.path.isfile(os.path.join(directory, name, ".metadata")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the rename durable, not only visible
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(directory: str, tmp: str, final: str, nonce: str, keep_last: int):
    """Rank 0, after every rank wrote its part: publish ``tmp`` as ``final``, then prune."""
    if os.path.exists(final):
        # The same step saved again (a run resumed from an earlier step): a directory cannot be
        # renamed over a non-empty one, so the old one steps aside first.
        os.rename(final, f"{final}.old-{nonce}")
    os.rename(tmp, final)
    _fsync_dir(directory)
    steps = _complete_steps(directory)
    for step in steps[:-keep_last] if keep_last > 0 else ():
        shutil.rmtree(_step_dir(directory, step), ignore_errors=True)
    for name in os.listdir(directory):
        if _STRAY_DIR.match(name):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _read_metadata(path: str):
    import torch.distributed.checkpoint as dcp

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"aiter_dist.checkpoint.load: {path} is not a complete "
                                f"checkpoint (no .metadata in it); pass a path returned by "
                                f"aiter_dist.checkpoint.save() or latest()")
    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def _dcp_load(state: dict, path: str, g):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if g is None:  # DCP warns on every call without a process group: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), process_group=g,
                 no_dist=g is None)


# ----------------------------------------------------------------------------- public API

def save(directory, step: int, model: nn.Module, optimizer=None, extra: dict | None = None, *,
         group=None, keep_last: int = 0) -> str:
    """Save ``model``, ``optimizer`` and ``extra`` as ``<directory>/step<step:08d>/``.

    Args:
        directory: where checkpoints live (created if missing); on a file system every rank
            of ``group`` sees.
        step: the training step, 0 <= step < 10**8; recorded as ``extra["step"]``.
        model: the module whose parameters and persistent buffers are saved (a
            ``torch.compile`` wrapper is looked through). Tensor-parallel layers hold this
            rank's slices (see the module docstring for what is sharded); every other tensor
            must be the same on every rank.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or None. Its state
            is saved by parameter name.
        extra: anything else to restore: tensors (the same on every rank, e.g. a
            ``torch.Generator``'s ``get_state()``) and JSON values. ``"step"`` and
            ``"world_size"`` (this group's size) are filled in here.
        group: the process group whose ranks save together; default the world once
            torch.distributed is initialized, else this one process. Sharded layers are
            described over their own ``group``.
        keep_last: after saving, keep only this many complete checkpoints (the newest by step);
            0 keeps all.

    Returns the committed checkpoint's path, on every rank. A crash before the end leaves no
    ``stepNNNNNNNN`` directory, only a ``.tmp-`` one that :func:`latest` ignores and the next
    ``save`` removes. Saving a step that already exists replaces it.
    """
    import torch.distributed.checkpoint as dcp

    directory = os.fspath(directory)
    if not 0 <= int(step) < 10 ** 8:
        raise ValueError(f"aiter_dist.checkpoint.save: step must be in [0, 1e8), got {step}")
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"aiter_dist.checkpoint.save: extra keys {clash} are reserved (save "
                         f"records the step and world size itself); rename them")
    g, rank, world = _group(group)
    extra.update(step=int(step), world_size=world)
    tensors = {k: v.detach() for k, v in extra.items() if torch.is_tensor(v)}
    state = {"extra": tensors,
             "extra_json": _json({k: v for k, v in extra.items() if k not in tensors}, "extra")}

    model = _unwrap(model)
    sharder = _Sharder(_shard_specs(model))
    state["model"] = {n: sharder.wrap(n, _tp_slice(t)) if n in sharder.specs else t
                      for n, t in model.state_dict().items()}
    if optimizer is not None:
        params, names = _optim_names(model, optimizer)
        osd = optimizer.state_dict()
        per_param = {}
        for i, st in osd["state"].items():
            p, n = params[i], names[i]
            per_param[n] = {k: sharder.wrap(n, _tp_slice(v)) if (
                n in sharder.specs and torch.is_tensor(v) and v.shape == p.shape) else v
                for k, v in st.items()}
        groups = [{**{k: v for k, v in pg.items() if k != "params"},
                   "params": [names[i] for i in pg["params"]]} for pg in osd["param_groups"]]
        state["optim"] = {"state": per_param,
                          "param_groups_json": _json(groups, "optimizer hyperparameters")}

    final = _step_dir(directory, int(step))
    nonce = None
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        nonce = f"{os.getpid():x}{secrets.token_hex(4)}"
    nonce = _broadcast(nonce, g, world)  # one temporary directory for every rank
    tmp = f"{final}.tmp-{nonce}"
    with warnings.catch_warnings():
        if g is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), process_group=g,
                 no_dist=g is None)
    if world > 1:
        dist.barrier(group=g)  # every rank's files are written before the rename publishes them
    error = None
    if rank == 0:
        try:
            _commit(directory, tmp, final, nonce, int(keep_last))
        except OSError as e:
            error = f"aiter_dist.checkpoint.save: could not publish {tmp} as {final}: {e}"
    error = _broadcast(error, g, world)  # every rank returns once the checkpoint is visible
    if error:
        raise RuntimeError(error)
    return final


def latest(directory, group=None) -> str | None:
    """The newest complete checkpoint under ``directory`` (``<directory>/stepNNNNNNNN``, highest
    step), or None if there is none (or no such directory). Unfinished ``.tmp-`` directories are
    ignored. Group rank 0 looks and tells the others, so every rank gets the same answer."""
    directory = os.fspath(directory)
    g, rank, world = _group(group)
    found = None
    if rank == 0:
        steps = _complete_steps(directory)
        found = _step_dir(directory, steps[-1]) if steps else None
    return _broadcast(found, g, world)


@torch.no_grad()
def load(path, model: nn.Module, optimizer=None, *, group=None,
         expect: dict | None = None) -> dict:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), resharding
    to this run's layout: the loading group may have any size the model's layers divide by.

    Args:
        path: a checkpoint directory (from :func:`save` or :func:`latest`).
        model: the same architecture as saved, already parallelized as this run wants (each
            tensor-parallel layer receives its slice). Every parameter and persistent buffer
            must be in the checkpoint with the same full shape, and the checkpoint must hold no
            model tensor the model lacks (``ValueError`` naming them otherwise).
        optimizer: the optimizer over ``model``'s parameters, or None to skip its state. Its
            state need not exist yet (a fresh optimizer); it is replaced by the checkpoint's,
            matched by parameter name, and each group takes the saved hyperparameters of the
            parameters it holds.
        group: as in :func:`save`.
        expect: JSON values the checkpoint's ``extra`` must hold (e.g. the model config);
            a difference raises ``ValueError`` naming both, before any tensor is read.

    Returns ``extra``: its JSON values as saved (tuples come back as lists), its tensors on the
    CPU, ``"step"`` and ``"world_size"`` (the size of the group that saved it).
    """
    path = os.fspath(path)
    g, _, _ = _group(group)
    meta = _read_metadata(path)

    # 1. extra, which may stop the load before any tensor is touched.
    tensors = {k[len("extra."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in meta.items() if k.startswith("extra.")}
    state = {"extra": tensors, "extra_json": ""}
    _dcp_load(state, path, g)
    extra = {**json.loads(state["extra_json"]), **state["extra"]}
    if expect:
        want = json.loads(_json(expect, "expect"))
        if any(extra.get(k) != v for k, v in want.items()):
            saved = {k: extra.get(k) for k in want}
            raise ValueError(f"aiter_dist.checkpoint.load: {path} was saved with "
                             f"{json.dumps(saved, sort_keys=True)}, but this run has "
                             f"{json.dumps(want, sort_keys=True)}; resume with the settings it "
                             f"was saved with, or start a new checkpoint directory")

    # 2. model and optimizer tensors, each target shaped as this rank's slice.
    model = _unwrap(model)
    sharder = _Sharder(_shard_specs(model))
    msd = model.state_dict()
    target, wrong, split = {}, [], {}
    for n, t in msd.items():
        m = meta.get(f"model.{n}")
        full = sharder.full_shape(n, t)
        if m is None or not hasattr(m, "size") or tuple(m.size) != full:
            wrong.append(f"{n}: model {full}, checkpoint "
                         f"{tuple(m.size) if hasattr(m, 'size') else 'missing'}")
        if n in sharder.specs and _is_dtensor(t):  # FSDP2 over a tp slice: load the slice
            split[n] = torch.empty(t.shape, dtype=t.dtype, device=_local(t).device)
            target[n] = sharder.wrap(n, split[n])
        else:
            target[n] = sharder.wrap(n, t) if n in sharder.specs else t
    extra_keys = sorted(k[len("model."):] for k in meta
                        if k.startswith("model.") and k[len("model."):] not in msd)
    if wrong or extra_keys:
        raise ValueError(f"aiter_dist.checkpoint.load: {path} does not fit the model (a different "
                         f"architecture or config?): " + "; ".join(
                             wrong[:5] + [f"checkpoint-only tensors {extra_keys[:5]}"] * bool(
                                 extra_keys)))
    state = {"model": target}

    if optimizer is not None:
        params, names = _optim_names(model, optimizer)
        index = {n: i for i, n in enumerate(names)}
        per_param = {}
        for k, m in meta.items():
            if not k.startswith("optim.state."):
                continue
            name, _, key = k[len("optim.state."):].rpartition(".")
            if name not in index:
                continue  # state of a parameter this optimizer does not hold
            p = params[index[name]]
            if not hasattr(m, "size"):
                slot = None  # a non-tensor state value: DCP puts the saved object here
            elif tuple(m.size) == sharder.full_shape(name, p):  # shaped like p: sliced like p
                local = torch.empty_like(_local(p), dtype=m.properties.dtype)
                if _is_dtensor(p) and name in sharder.specs:  # FSDP2 over a tp slice
                    slot = sharder.wrap(name, torch.empty(p.shape, dtype=m.properties.dtype,
                                                          device=local.device))
                elif _is_dtensor(p):
                    from torch.distributed.tensor import DTensor
                    slot = DTensor.from_local(local, p.device_mesh, p.placements,
                                              run_check=False, shape=p.shape, stride=p.stride())
                else:
                    slot = sharder.wrap(name, local) if name in sharder.specs else local
            else:
                slot = torch.empty(tuple(m.size), dtype=m.properties.dtype)
            per_param.setdefault(name, {})[key] = slot
        state["optim"] = {"state": per_param, "param_groups_json": ""}
    _dcp_load(state, path, g)

    for n, whole in split.items():  # each dp rank keeps its part of the loaded tp slice
        _local(msd[n]).copy_(_dp_part(whole, msd[n]))
    model.load_state_dict(msd)  # msd's plain tensors share storage with the loaded slices
    if optimizer is not None:
        _set_optimizer(optimizer, params, names, state["optim"], sharder.specs)
    return extra


def _set_optimizer(optimizer, params: list, names: list, loaded: dict, specs: dict):
    """Hand the loaded, name-keyed state to ``optimizer`` in its own index order; each group
    takes the saved hyperparameters if all its parameters were in one saved group."""
    from torch.distributed.tensor import DTensor

    pos = {id(p): i for i, p in enumerate(params)}
    index = {n: i for i, n in enumerate(names)}
    state = {}
    for name, st in loaded["state"].items():
        i = index[name]
        p = params[i]
        if _is_dtensor(p) and name in specs:  # FSDP2 over a tp slice: this dp rank's part
            state[i] = {k: DTensor.from_local(_dp_part(v.to_local(), p), p.device_mesh,
                                              p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride())
                        if _is_dtensor(v) else v for k, v in st.items()}
            continue
        plain = not _is_dtensor(p)  # the DTensor wrapper was only for DCP
        state[i] = {k: v.to_local() if plain and _is_dtensor(v) else v for k, v in st.items()}
    saved = json.loads(loaded["param_groups_json"] or "[]")
    group_of = {n: j for j, sg in enumerate(saved) for n in sg["params"]}
    groups = []
    for pg in optimizer.param_groups:
        ids = [pos[id(p)] for p in pg["params"]]
        hyper = {k: v for k, v in pg.items() if k != "params"}
        owners = {group_of.get(names[i]) for i in ids}
        if len(owners) == 1 and None not in owners:
            for k, v in saved[owners.pop()].items():
                if k != "params" and k in hyper:
                    hyper[k] = _like(hyper[k], v)
        groups.append({**hyper, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(cur, v):
    """A hyperparameter read back from JSON, in the type the optimizer holds it as."""
    if torch.is_tensor(cur):
        return torch.tensor(v, dtype=cur.dtype, device=cur.device)
    return tuple(v) if isinstance(cur, tuple) else v
