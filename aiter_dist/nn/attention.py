"""Tensor-parallel causal self-attention over ``aiter_dist.flash_attn_func``."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.flash_attn import flash_attn_func
from ..kernels.rope import apply_rotary_emb_qk
from .linear import ColumnParallelLinear, RowParallelLinear, _divide, _group_info


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None):
    """cos/sin (max_seq_len, head_dim / 2): one angle per rotated pair (rotate-half), fp64 math."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


class ParallelAttention(nn.Module):
    """Causal self-attention with whole heads split across ``group``.

    ``q_proj``/``k_proj``/``v_proj`` are column-parallel (this rank's ``num_heads / world`` query
    heads and ``num_kv_heads / world`` KV heads), ``o_proj`` row-parallel; rotary embeddings
    (:func:`aiter_dist.apply_rotary_emb_qk`), then flash attention (GQA native). Input (batch, seq, hidden), replicated; output the same.

    Args:
        hidden_size: the model width (input and output features).
        num_heads: query heads; a multiple of ``num_kv_heads`` and divisible by the group size.
        num_kv_heads: key/value heads (default ``num_heads``); divisible by the group size.
        head_dim: default ``hidden_size // num_heads``; a multiple of 8 up to 256 (flash
            attention's rule).
        bias: biases on the four projections.
        rope_theta, max_seq_len: rotate-half rotary embeddings at positions ``0 .. seq - 1``;
            longer inputs raise ``ValueError``.
        group, device, dtype: as in :class:`ColumnParallelLinear`.

    Forward: ``x`` (batch, seq, hidden_size), the same on every rank, float32 or float16 on CPU
    (bfloat16 too on GPU); returns (batch, seq, hidden_size), the same on every rank. Every rank
    must call it with the same shapes in the same order (the projections run collectives).

    Autograd: gradients reach ``x`` (complete on every rank, summed over the group by the
    column-parallel projections' backward) and every parameter (this rank's shards). Numerics:
    :func:`aiter_dist.flash_attn_func` with ``causal=True`` and its default non-deterministic
    backward (dq summed with atomics); the output projection's all-reduce gives every rank the
    same bits on its kernel paths.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, rope_theta: float = 10000.0,
                 max_seq_len: int = 4096, group=None, device=None, dtype=None):
        super().__init__()
        group, _, world = _group_info(group)
        num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"aiter_dist.nn.ParallelAttention: num_heads={num_heads} must be a "
                             f"multiple of num_kv_heads={num_kv_heads}")
        _divide(num_kv_heads, world, "num_kv_heads", "ParallelAttention")
        _divide(num_heads, world, "num_heads", "ParallelAttention")
        kw = dict(group=group, device=device, dtype=dtype)
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias, **kw)
        self.k_proj = ColumnParallelLinear(hidden_size, num_kv_heads * self.head_dim, bias, **kw)
        self.v_proj = ColumnParallelLinear(hidden_size, num_kv_heads * self.head_dim, bias, **kw)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias, **kw)
        cos, sin = rope_tables(self.head_dim, max_seq_len, rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        if s > self.rope_cos.shape[0]:
            raise ValueError(f"aiter_dist.nn.ParallelAttention: sequence length {s} exceeds "
                             f"max_seq_len={self.rope_cos.shape[0]}")
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        q, k = apply_rotary_emb_qk(q, k, cos, sin)
        out = flash_attn_func(q, k, v, causal=True)
        return self.o_proj(out.reshape(b, s, -1))
