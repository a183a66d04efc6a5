"""A plain-PyTorch Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU), byte-level vocabulary.

No aiter_dist import here: ``aiter_dist.parallelize(model)`` finds the layers by attribute name,
so the names below are part of the contract:

* ``RMSNorm`` with ``.weight`` and ``.eps``;
* ``Attention`` with ``q_proj, k_proj, v_proj, o_proj`` (``nn.Linear``, no bias), ``head_dim``,
  ``_rope(q, k, cos, sin)`` and ``_attend(q, k, v)`` (the one place each kernel is called, so it
  can be swapped);
* ``MLP`` with ``gate_proj, up_proj, down_proj`` and ``_act(gate, up)`` (SwiGLU's activation);
* ``Llama`` with ``lm_head`` and ``_loss(h, targets)`` (the head and the loss together, so a fused
  linear + cross-entropy can replace both): ``model(tokens, targets)`` returns the mean loss,
  ``model(tokens)`` the logits.

``Attention.forward`` takes its head counts from the projection outputs, not from the config, so
it keeps working when the projections are replaced by tensor-parallel shards that produce only
this rank's heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 256  # bytes
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS = {
    # CPU smoke-test size: trains visibly in a few dozen steps on two cores; 4 kv heads allow
    # TP up to 4 (checkpoints saved at one world size resume at another).
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=176, max_seq_len=64),
    # ~140M parameters (the 256-entry embedding is negligible); 8 kv heads allow TP up to 8.
    "small": LlamaConfig(dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, ffn_dim=2816,
                         max_seq_len=1024),
    "1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      max_seq_len=2048, rope_theta=500000.0),
    # Llama-3-8B's shape; ~7.0B parameters, not 8.0B, because the vocabulary is 256 bytes rather
    # than 128k tokens. max_seq_len is the training window used here, not the model's limit.
    "8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=2048, rope_theta=500000.0),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics whatever the input dtype (bf16 sums of squares lose too much).
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos/sin of shape (max_seq_len, head_dim / 2): one angle per rotated pair (flash-attn's
    layout), for the rotate-half (GPT-NeoX) convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim / 2). Math in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: recomputed from the config, so not in checkpoints and not sharded.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _attend(self, q, k, v):
        """Causal attention; q: (b, s, hq, d), k/v: (b, s, hkv, d) with hq % hkv == 0.
        Returns (b, s, hq, d)."""
        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            # Query head i uses kv head i // rep; this holds for a contiguous shard of heads too.
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    def _rope(self, q, k, cos, sin):
        """Rotary embedding of q (b, s, hq, d) and k (b, s, hkv, d); cos/sin (s, d / 2)."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x):
        b, s, _ = x.shape
        # -1: the number of heads this rank holds (all of them unless tensor-parallel).
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        q, k = self._rope(q, k, cos, sin)
        out = self._attend(q, k, v)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def _act(self, gate, up):
        return F.silu(gate) * up

    def forward(self, x):
        return self.down_proj(self._act(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Deterministic from torch's seed: modules are visited in a fixed order.
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def _loss(self, h, targets):
        """Mean next-token cross-entropy of the head's logits (fp32) against ``targets``."""
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())

    def forward(self, tokens, targets=None):
        """Logits (batch, seq, vocab), or with ``targets`` (batch, seq) the mean loss."""
        x = self.tok_emb(tokens)
        for layer in self.layers:
            x = layer(x)
        h = self.norm(x)
        return self.lm_head(h) if targets is None else self._loss(h, targets)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters of the full (unsharded) model as built; call before parallelizing."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embedding else n


def flops_per_token(cfg: LlamaConfig, seq_len: int, n_params_matmul: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores
    and values, 12 * layers * dim * seq (PaLM's convention: causal masking not discounted)."""
    return 6.0 * n_params_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len


if __name__ == "__main__":
    for name, c in CONFIGS.items():
        with torch.device("meta"):
            n = Llama(c).num_params()
        print(f"{name}: {n / 1e6:.1f}M parameters")
