"""``parallelize(model)``: make a Llama-style model tensor-parallel in place.

Found by attribute names (the example Llama's, which are also Hugging Face Llama's):
* attention blocks with ``q_proj, k_proj, v_proj, o_proj``: q/k/v become column-parallel (whole
  heads per rank), ``o_proj`` row-parallel; a block that routes its attention through an
  ``_attend(q, k, v)`` method (causal, (batch, seq, heads, head_dim)) gets aiter_dist's flash
  attention there (``attention="flash"``, the default; ``"keep"`` leaves the model's own);
* MLP blocks with ``gate_proj, up_proj, down_proj``: gate/up column-parallel, down row-parallel;
* RMSNorm modules (``torch.nn.RMSNorm`` or any class named ``*RMSNorm`` with ``weight`` and ``eps``
  or ``variance_epsilon``)
  become ``aiter_dist.nn.RMSNorm``.
Each rank must hold the same full weights first (same seed, or loaded from one checkpoint): every
parallel layer copies its shard from them. Embeddings and the output head stay replicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .kernels.flash_attn import flash_attn_func
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


def parallelize(model: nn.Module, group=None, attention: str = "flash") -> nn.Module:
    """Replace ``model``'s projections and norms with aiter_dist's tensor-parallel modules, in
    place, and return it. ``group`` defaults to the world (``aiter_dist.init_distributed()``).
    ``attention``: ``"flash"`` routes ``_attend`` methods to aiter_dist's flash attention,
    ``"keep"`` leaves them."""
    if attention not in ("flash", "keep"):
        raise ValueError(f"aiter_dist.parallelize: attention must be 'flash' or 'keep', "
                         f"got {attention!r}")
    group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    world = dist.get_world_size(group) if group is not None else 1
    counts = {"column": 0, "row": 0, "norm": 0, "attention": 0}
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
    model.aiter_parallel = dict(counts, world_size=world)
    return model
