"""``parallelize(model)``: make a Llama-style model tensor-parallel in place.

Found by attribute names (the example Llama's, which are also Hugging Face Llama's):
* attention blocks with ``q_proj, k_proj, v_proj, o_proj``: q/k/v become column-parallel (whole
  heads per rank), ``o_proj`` row-parallel; a block that routes its attention through an
  ``_attend(q, k, v)`` method (causal, (batch, seq, heads, head_dim)) gets aiter_dist's flash
  attention there (``attention="flash"``, the default; ``"keep"`` leaves the model's own);
* MLP blocks with ``gate_proj, up_proj, down_proj``: gate/up column-parallel, down row-parallel;
* RMSNorm modules (``torch.nn.RMSNorm`` or any class named ``*RMSNorm`` with ``weight`` and ``eps``
  or ``variance_epsilon``)
  become ``aiter_dist.nn.RMSNorm``;
* the training ops (``train_ops=True``): an attention block's ``_rope(q, k, cos, sin)`` becomes
  :func:`aiter_dist.apply_rotary_emb_qk` (q and k in one kernel), an MLP's ``_act(gate, up)``
  :func:`aiter_dist.swiglu`, and a model's ``_loss(h, targets)`` beside an ``nn.Linear``
  ``lm_head`` the fused :func:`aiter_dist.linear_cross_entropy` (one rank: no logits are
  materialized) or, tensor-parallel, a vocab-parallel head (``ColumnParallelLinear`` that
  gathers its logits only when asked for them) with :func:`aiter_dist.vocab_parallel_cross_entropy`.
Each rank must hold the same full weights first (same seed, or loaded from one checkpoint): every
parallel layer copies its shard from them. Embeddings stay replicated.

Fused communication (``fuse_norm=True``, the default) applies to a model laid out like the
example's Llama: an embedding (``tok_emb`` or ``embed_tokens``), ``layers`` of pre-norm blocks
(``attn_norm, attn, mlp_norm, mlp``; ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``), a
final ``norm`` and an ``lm_head``. The model's forward then carries ``(normed, residual)`` from
block to block, and every row-parallel output meets the residual add and the next norm in one
``all_reduce_add_rms_norm``. ``sequence_parallel=True`` shards the residual stream by tokens
instead: ``reduce_scatter_add_rms_norm`` where a row-parallel output meets it, an all-gather
before each column-parallel block, ``rms_norm_all_gather`` for the first norm; the loss is the
plain mode's. Other models keep one all-reduce per row-parallel layer (recorded in
``model.aiter_parallel["fused_norm"]``); asking them for sequence parallelism is an error.
"""
from __future__ import annotations

import fnmatch
import types

import torch
import torch.distributed as dist
from torch import nn

from .comm.all_reduce import all_reduce
from .comm.fused_norm import (all_reduce_add_rms_norm, reduce_scatter_add_rms_norm,
                              rms_norm_all_gather)
from .comm.gather_scatter import all_gather
from .comm.tensor_parallel import gather_first_dim, split_first_dim
from .comm.vocab_parallel import vocab_parallel_cross_entropy
from .kernels._runtime import log
from .kernels.cross_entropy import linear_cross_entropy
from .kernels.flash_attn import flash_attn_func
from .kernels.rope import apply_rotary_emb_qk
from .kernels.swiglu import swiglu
from .nn import ColumnParallelLinear, RMSNorm, RowParallelLinear

_ATTN = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
_MLP = (("gate_proj", "up_proj"), ("down_proj",))


def _is_rmsnorm(m: nn.Module) -> bool:
    if isinstance(m, RMSNorm):
        return False
    if isinstance(m, getattr(nn, "RMSNorm", ())):
        return m.weight is not None
    return type(m).__name__.endswith("RMSNorm") and isinstance(
        getattr(m, "weight", None), torch.Tensor) and _norm_eps(m, required=False) is not None


def _norm_eps(m: nn.Module, required: bool = True):
    # torch.nn.RMSNorm and the example call it eps (None: the dtype's epsilon); Hugging Face's
    # LlamaRMSNorm calls it variance_epsilon.
    for name in ("eps", "variance_epsilon"):
        if hasattr(m, name):
            eps = getattr(m, name)
            return eps if eps is not None else torch.finfo(m.weight.dtype).eps
    return None


def _to_aiter_norm(m: nn.Module) -> RMSNorm:
    eps = _norm_eps(m)
    norm = RMSNorm(m.weight.shape[-1], eps=eps, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(m.weight)
    return norm


def _check_heads(block: nn.Module, world: int):
    head_dim = getattr(block, "head_dim", None)
    if head_dim is None:
        return
    for name in ("q_proj", "k_proj"):
        heads = getattr(block, name).out_features // head_dim
        if heads % world:
            raise ValueError(f"aiter_dist.parallelize: {type(block).__name__}.{name} has {heads} "
                             f"heads, not divisible by the tensor-parallel world size {world}")


def _flash_causal_attend(q, k, v):
    """Causal attention over (batch, seq, heads, head_dim); GQA without repeating k/v."""
    return flash_attn_func(q, k, v, causal=True)


def _rope_qk(q, k, cos, sin):
    """Rotate-half rotary embedding of q and k in one launch; cos/sin (seq, head_dim / 2)."""
    return apply_rotary_emb_qk(q, k, cos, sin)


def _autocast_input(h):
    """The head's input in autocast's dtype where autocast is on (as ``nn.Linear`` would run)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return h.to(torch.get_autocast_dtype(dev))
    return h


def _linear_cross_entropy_loss(model, h, targets):
    """The head and the mean loss in one op, the logits never materialized whole."""
    head = model.lm_head
    return linear_cross_entropy(_autocast_input(h), head.weight, targets, bias=head.bias)


def _vocab_parallel_loss(model, h, targets):
    """This rank's vocabulary shard of the logits and the loss over the whole vocabulary."""
    head = model.lm_head
    return vocab_parallel_cross_entropy(head.forward_shard(h), targets, head.group)


def _install_train_ops(model, group, world, counts) -> str:
    """Swap the rotary embedding, SwiGLU and the head's loss for aiter_dist's; returns the loss
    in use (or why the model's own stays)."""
    for m in model.modules():
        if all(isinstance(getattr(m, n, None), nn.Module) for n in _ATTN[0]) \
                and callable(getattr(m, "_rope", None)):
            m._rope = _rope_qk
            counts["rope"] += 1
        if all(isinstance(getattr(m, n, None), nn.Module) for n in _MLP[0]) \
                and callable(getattr(m, "_act", None)):
            m._act = swiglu
            counts["swiglu"] += 1
    head = getattr(model, "lm_head", None)
    if not callable(getattr(model, "_loss", None)) or type(head) is not nn.Linear:
        return "model's own (no _loss(h, targets) beside an nn.Linear lm_head)"
    if world > 1:
        model.lm_head = ColumnParallelLinear.from_linear(head, group, gather_output=True)
        model._loss = types.MethodType(_vocab_parallel_loss, model)
        return "vocab_parallel_cross_entropy"
    model._loss = types.MethodType(_linear_cross_entropy_loss, model)
    return "linear_cross_entropy"


# ----------------------------------------------------------------------------- fused forward

_EMBEDDINGS = ("tok_emb", "embed_tokens")
_BLOCK = ("attn_norm", "attn", "mlp_norm", "mlp")


def _chain_layout(model: nn.Module):
    """(embedding, blocks, final norm, head) if ``model`` is laid out for the fused forward, else
    the reason it is not."""
    emb = next((getattr(model, n) for n in _EMBEDDINGS
                if isinstance(getattr(model, n, None), nn.Embedding)), None)
    layers, norm, head = (getattr(model, n, None) for n in ("layers", "norm", "lm_head"))
    if emb is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0 \
            or not isinstance(norm, RMSNorm) or not isinstance(head, nn.Module):
        return None, ("the model has no embedding (tok_emb/embed_tokens), layers, RMSNorm norm "
                      "and lm_head")
    for i, blk in enumerate(layers):
        parts = [getattr(blk, n, None) for n in _BLOCK]
        if not (isinstance(parts[0], RMSNorm) and isinstance(parts[2], RMSNorm)
                and isinstance(getattr(parts[1], "o_proj", None), RowParallelLinear)
                and isinstance(getattr(parts[3], "down_proj", None), RowParallelLinear)):
            return None, f"layers[{i}] is not an attn_norm/attn/mlp_norm/mlp pre-norm block"
        if parts[1].o_proj.bias is not None or parts[3].down_proj.bias is not None:
            return None, f"layers[{i}]'s row-parallel projections have a bias"
    return (emb, layers, norm, head), None


def _fused_block_forward(block, x):
    """One block on its own (outside the fused model forward): the attention's reduce is fused
    with the residual add and the MLP's norm."""
    g = block.attn.o_proj.group
    h, res = all_reduce_add_rms_norm(block.attn(block.attn_norm(x)), x, block.mlp_norm.weight,
                                     block.mlp_norm.eps, g)
    return res + all_reduce(block.mlp(h).contiguous(), g)


def _sequence_parallel_block_forward(block, x):
    raise RuntimeError("aiter_dist.parallelize(sequence_parallel=True): blocks take token shards "
                       "and run inside the model's forward, which shards and gathers the tokens; "
                       "call the model, not a block")


def _fused_model_forward(model, tokens, targets=None):
    """The model's forward with (normed, residual) carried between blocks: each row-parallel
    output is reduced together with the residual add and the next norm. With ``targets`` the
    model's loss (``model._loss(h, targets)``), else the logits."""
    emb, first_norm, steps, _ = model._aiter_layout
    group, sp = model._aiter_group, model._aiter_sequence_parallel
    # A vocab-parallel head is tensor-parallel: its input gradient is partial on each rank.
    sharded_head = isinstance(model.lm_head, ColumnParallelLinear)
    x = emb(tokens)
    shape = x.shape
    if sp:
        # Tokens along dim 0, this rank's share of them in the residual stream.
        res = split_first_dim(x.reshape(-1, shape[-1]), group)
        h = rms_norm_all_gather(res, first_norm.weight, first_norm.eps, group).view(shape)
    else:
        res = x
        h = first_norm(x)
    for sub, norm, last in steps:
        partial = sub(h)
        if sp:
            out, res = reduce_scatter_add_rms_norm(partial.reshape(-1, shape[-1]), res,
                                                   norm.weight, norm.eps, group)
            # Into tensor-parallel layers the gather's backward sums their partial input
            # gradients; into the replicated head every rank's gradient is already whole.
            h = gather_first_dim(out, group) if last and not sharded_head \
                else all_gather(out, 0, group)
            h = h.view(*shape[:-1], h.shape[-1])
        else:
            h, res = all_reduce_add_rms_norm(partial, res, norm.weight, norm.eps, group)
    return model.lm_head(h) if targets is None else model._loss(h, targets)


def _install_fused_forward(model, group, sequence_parallel: bool) -> str | None:
    """Switch ``model`` to the fused forward; returns why not, or None."""
    layout, reason = _chain_layout(model)
    if layout is None:
        return reason
    for blk in layout[1]:
        blk.attn.o_proj.reduce_output = False
        blk.mlp.down_proj.reduce_output = False
        if sequence_parallel:
            for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.mlp.gate_proj,
                        blk.mlp.up_proj):
                lin.input_gathered = True
            blk.forward = types.MethodType(_sequence_parallel_block_forward, blk)
        else:
            blk.forward = types.MethodType(_fused_block_forward, blk)
    emb, layers, final_norm, head = layout
    if sequence_parallel and isinstance(head, ColumnParallelLinear):
        head.input_gathered = True  # fed by an all-gather whose backward sums its gradient
    # (row-parallel sublayer, the norm its reduced output meets, whether the head comes next)
    nexts = [blk.attn_norm for blk in layers[1:]] + [final_norm]
    steps = [step for blk, nxt in zip(layers, nexts)
             for step in ((blk.attn, blk.mlp_norm, False), (blk.mlp, nxt, nxt is final_norm))]
    model._aiter_layout = (emb, layers[0].attn_norm, steps, head)
    model._aiter_group = group
    model._aiter_sequence_parallel = sequence_parallel
    model.forward = types.MethodType(_fused_model_forward, model)
    return None


# ----------------------------------------------------------------------------- plans

# A plan maps module names (fnmatch patterns over ``model.named_modules()``) to a style.
# Linear styles take an ``nn.Linear`` and put the parallel layer holding this rank's shard in
# its place; ``*_sp`` styles are sequence-parallel (tokens along dim 0 sharded over the group):
# the column layer takes this rank's tokens and all-gathers them under its GEMM
# (all_gather_gemm), the row layer returns this rank's tokens of the reduced output
# (gemm_reduce_scatter).
_LINEAR_STYLES = {
    "colwise": (ColumnParallelLinear, {}),
    "colwise_gather": (ColumnParallelLinear, {"gather_output": True}),
    "colwise_sp": (ColumnParallelLinear, {"sequence_parallel": True}),
    "rowwise": (RowParallelLinear, {}),
    "rowwise_sp": (RowParallelLinear, {"sequence_parallel": True}),
}
PLAN_STYLES = tuple(_LINEAR_STYLES) + ("rmsnorm",)


def _apply_plan(model: nn.Module, plan: dict, group) -> dict:
    """Replace the modules ``plan`` names by their parallel style; returns counts per style."""
    bad = {k: v for k, v in plan.items() if v not in PLAN_STYLES}
    if bad:
        raise ValueError(f"aiter_dist.parallelize: unknown plan style(s) {bad}; styles are "
                         f"{', '.join(PLAN_STYLES)}")
    names = [n for n, _ in model.named_modules() if n]
    chosen: dict = {}
    for pattern, style in plan.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"aiter_dist.parallelize: plan entry {pattern!r} matches no module "
                             f"of {type(model).__name__} (module names look like "
                             f"{names[:4]})")
        for n in hits:
            if n in chosen and chosen[n] != style:
                raise ValueError(f"aiter_dist.parallelize: module {n!r} matches plan entries of "
                                 f"two styles ({chosen[n]!r} and {style!r})")
            chosen[n] = style
    counts = {style: 0 for style in PLAN_STYLES}
    for name, style in chosen.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, attr)
        if style == "rmsnorm":
            if not _is_rmsnorm(mod):
                raise ValueError(f"aiter_dist.parallelize: plan says {name!r} is 'rmsnorm' but "
                                 f"it is a {type(mod).__name__} (an RMSNorm with weight and eps)")
            setattr(parent, attr, _to_aiter_norm(mod))
        else:
            if type(mod) is not nn.Linear:
                raise ValueError(f"aiter_dist.parallelize: plan style {style!r} takes an "
                                 f"nn.Linear; {name!r} is a {type(mod).__name__}")
            cls, kwargs = _LINEAR_STYLES[style]
            setattr(parent, attr, cls.from_linear(mod, group, **kwargs))
        counts[style] += 1
    return counts


# ----------------------------------------------------------------------------- parallelize

def parallelize(model: nn.Module, group=None, attention: str = "flash", fuse_norm: bool = True,
                sequence_parallel: bool = False, train_ops: bool = True,
                plan: dict | None = None) -> nn.Module:
    """Make ``model`` tensor-parallel in place and return it.

    With ``plan`` (any model): a dict from module names (``fnmatch`` patterns over
    ``model.named_modules()``, e.g. ``"layers.*.fc1"``) to a style: ``"colwise"``,
    ``"colwise_gather"``, ``"rowwise"`` (:class:`~aiter_dist.nn.ColumnParallelLinear` /
    :class:`~aiter_dist.nn.RowParallelLinear` over an ``nn.Linear``), ``"colwise_sp"`` /
    ``"rowwise_sp"`` (the same with ``sequence_parallel=True``: tokens sharded along dim 0, the
    gather and the reduce-scatter overlapped with the GEMM by :func:`aiter_dist.all_gather_gemm`
    / :func:`aiter_dist.gemm_reduce_scatter`), ``"rmsnorm"`` (:class:`~aiter_dist.nn.RMSNorm`).
    Only what the plan names changes: the other arguments (attention, fused norms, training ops,
    the Llama forward) apply without a plan. Every entry must match a module, a module may match
    entries of one style only (``ValueError`` otherwise). ``model.aiter_parallel`` then holds
    the count per style. Under the ``*_sp`` styles the code between the layers runs on token
    shards, so a replicated parameter used there (a norm's weight) gets this rank's tokens'
    share of its gradient: all-reduce those over the group before the optimizer step (Megatron's
    rule for sequence-parallel parameters).

    Without a plan:
    Modules are found by attribute name: in blocks holding ``q_proj, k_proj, v_proj, o_proj``
    (``nn.Linear``) q/k/v become :class:`~aiter_dist.nn.ColumnParallelLinear` and ``o_proj`` a
    :class:`~aiter_dist.nn.RowParallelLinear`; in blocks holding ``gate_proj, up_proj,
    down_proj`` gate/up become column-parallel and ``down_proj`` row-parallel; RMSNorm modules
    (``torch.nn.RMSNorm``, or any ``*RMSNorm`` class with ``weight`` and ``eps`` or
    ``variance_epsilon``) become :class:`~aiter_dist.nn.RMSNorm`. Embeddings, the output head
    and anything else stay replicated.

    Args:
        model: the full model, with the same weights on every rank (same seed, or one
            checkpoint): each parallel layer copies its shard from them. Head counts and
            projection widths must be divisible by the group size (``ValueError`` otherwise).
        group: the tensor-parallel group; default the world (``aiter_dist.init_distributed()``).
            Without torch.distributed the layers are plain one-process layers.
        attention: ``"flash"`` (default) routes the attention blocks' ``_attend(q, k, v)``
            methods (causal, (batch, seq, heads, head_dim)) to :func:`aiter_dist.flash_attn_func`;
            ``"keep"`` leaves the model's own.
        fuse_norm: for a model laid out like the example's Llama (``tok_emb``/``embed_tokens``,
            ``layers`` of ``attn_norm, attn, mlp_norm, mlp`` pre-norm blocks, ``norm``,
            ``lm_head``) replace its forward so each row-parallel output meets the residual add
            and the next norm in one :func:`aiter_dist.all_reduce_add_rms_norm`. Other models
            keep one all-reduce per row-parallel layer (logged once).
        sequence_parallel: shard the residual stream by tokens (batch * seq divisible by the
            group size) with :func:`aiter_dist.reduce_scatter_add_rms_norm` and all-gathers;
            only for the Llama layout (``ValueError`` otherwise).
        train_ops: route ``_rope(q, k, cos, sin)`` methods to
            :func:`aiter_dist.apply_rotary_emb_qk` (cos/sin (seq, head_dim / 2), rotate-half),
            ``_act(gate, up)`` methods of MLPs to :func:`aiter_dist.swiglu`, and a model-level
            ``_loss(h, targets)`` (with an ``nn.Linear`` ``lm_head``) to
            :func:`aiter_dist.linear_cross_entropy` on one rank, or to a vocab-parallel head
            (:class:`~aiter_dist.nn.ColumnParallelLinear` over the vocabulary; ``model(tokens)``
            still returns whole logits) and :func:`aiter_dist.vocab_parallel_cross_entropy`.

    Returns the same ``model``, with ``model.aiter_parallel`` recording what was replaced
    (``column``, ``row``, ``norm``, ``attention``, ``rope``, ``swiglu`` counts, ``loss``,
    ``world_size``, ``fused_norm``).

    Every rank must then run the same forward and backward calls with the same input shapes
    (the layers issue collectives; ranks that disagree get a ``RuntimeError``). Inputs (token
    ids) are the same on every rank; outputs (logits) come out the same on every rank.
    Gradients: every replicated parameter's gradient is complete and equal on every rank, each
    sharded one is this rank's shard of the full gradient. The loss matches the unparallelized
    model within floating-point tolerance, not bitwise (the sums run in another order).
    """
    if attention not in ("flash", "keep"):
        raise ValueError(f"aiter_dist.parallelize: attention must be 'flash' or 'keep', "
                         f"got {attention!r}")
    group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    world = dist.get_world_size(group) if group is not None else 1
    if plan is not None:
        model.aiter_parallel = dict(_apply_plan(model, plan, group), world_size=world,
                                    plan=dict(plan))
        return model
    counts = {"column": 0, "row": 0, "norm": 0, "attention": 0, "rope": 0, "swiglu": 0}
    for block in list(model.modules()):
        for cols, rows in (_ATTN, _MLP):
            if not all(isinstance(getattr(block, n, None), nn.Linear) for n in cols + rows):
                continue
            if cols == _ATTN[0]:
                _check_heads(block, world)
                if attention == "flash" and callable(getattr(block, "_attend", None)):
                    block._attend = _flash_causal_attend
                    counts["attention"] += 1
            for n in cols:
                setattr(block, n, ColumnParallelLinear.from_linear(getattr(block, n), group))
                counts["column"] += 1
            for n in rows:
                setattr(block, n, RowParallelLinear.from_linear(getattr(block, n), group))
                counts["row"] += 1
        for name, child in list(block.named_children()):
            if _is_rmsnorm(child):
                setattr(block, name, _to_aiter_norm(child))
                counts["norm"] += 1
    if counts["column"] == 0 and counts["norm"] == 0:
        raise ValueError("aiter_dist.parallelize: found no attention/MLP projections "
                         "(q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/down_proj) and no "
                         "RMSNorm in the model; nothing to parallelize")
    loss = _install_train_ops(model, group, world, counts) if train_ops else "model's own"
    fused = None
    if sequence_parallel or fuse_norm:
        reason = _install_fused_forward(model, group, sequence_parallel) if group is not None \
            else "no process group"
        if reason is not None and sequence_parallel:
            raise ValueError(f"aiter_dist.parallelize: sequence_parallel=True needs a model laid "
                             f"out like the example's Llama; {reason}")
        if reason is not None and group is not None:
            log.warning("aiter_dist.parallelize: row-parallel outputs are all-reduced unfused "
                        "(%s)", reason)
        fused = "sequence_parallel" if sequence_parallel else (
            "all_reduce_add_rms_norm" if reason is None else f"no: {reason}")
    model.aiter_parallel = dict(counts, loss=loss, world_size=world, fused_norm=fused or "off")
    return model
