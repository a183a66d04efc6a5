"""Tensor-parallel attention: ParallelAttention and parallelize()'d Llama against unsharded
references, flash attention against SDPA inside the example model."""
import importlib.util
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import aiter_dist
from aiter_dist.kernels.flash_attn import attention_ref
from aiter_dist.kernels.rope import apply_rotary_emb_ref
from aiter_dist.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama_module():
    """The example's plain-PyTorch Llama (registered under its own name: dataclasses need it)."""
    if "example_llama" not in sys.modules:
        spec = importlib.util.spec_from_file_location("example_llama",
                                                      os.path.join(ROOT, "examples", "llama.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["example_llama"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["example_llama"]


def _full_attention(layer_parts, x, head_dim):
    """The unsharded computation in float64 from full weights."""
    wq, wk, wv, wo, cos, sin = layer_parts
    b, s, _ = x.shape
    q = (x @ wq.T).view(b, s, -1, head_dim)
    k = (x @ wk.T).view(b, s, -1, head_dim)
    v = (x @ wv.T).view(b, s, -1, head_dim)
    cos, sin = cos[:s].double(), sin[:s].double()
    q, k = apply_rotary_emb_ref(q, cos, sin), apply_rotary_emb_ref(k, cos, sin)
    out, _ = attention_ref(q, k, v, None, True)
    return out.reshape(b, s, -1) @ wo.T


def _parallel_attention_vs_full(rank, world):
    hidden, heads, kv_heads, seq = 32, 4, 2, 19
    torch.manual_seed(0)
    full = [nn.Linear(hidden, n, bias=False) for n in (heads * 8, kv_heads * 8, kv_heads * 8)]
    wo = nn.Linear(heads * 8, hidden, bias=False)
    layer = aiter_dist.nn.ParallelAttention(hidden, heads, kv_heads, max_seq_len=64)
    for proj, lin in zip((layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj), full + [wo]):
        proj.load_full_weight(lin.weight.detach())
    x = torch.randn(2, seq, hidden, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref = _full_attention([l.weight.detach().double() for l in full + [wo]]
                          + [layer.rope_cos, layer.rope_sin], x64, 8)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert aiter_dist.last_path("flash_attn").startswith("triton")
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_parallel_attention_matches_unsharded(world):
    run_distributed(_parallel_attention_vs_full, world)


def test_example_llama_flash_matches_sdpa():
    llama = _llama_module()
    cfg = llama.CONFIGS["tiny"]
    torch.manual_seed(0)
    model = llama.Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 37))
    sdpa_logits = model(tokens)
    aiter_dist.parallelize(model)  # no process group: world 1, flash attention swapped in
    assert model.aiter_parallel["attention"] == cfg.n_layers
    flash_logits = model(tokens)
    torch.testing.assert_close(flash_logits, sdpa_logits, rtol=1e-4, atol=1e-4)


def _shard_of(ref_grad, module, rank, world):
    """The part of the unsharded gradient this rank's parameter holds."""
    if isinstance(module, aiter_dist.nn.ColumnParallelLinear):
        return ref_grad.chunk(world, dim=0)[rank]
    if isinstance(module, aiter_dist.nn.RowParallelLinear):
        return ref_grad.chunk(world, dim=1)[rank]
    return ref_grad


MODES = {"fused": dict(), "unfused": dict(fuse_norm=False), "sp": dict(sequence_parallel=True)}


def _tp_llama_vs_unsharded(rank, world, mode):
    """Logits, loss and every parameter's gradient of the parallelized Llama against the
    unsharded model, in each communication mode."""
    llama = _llama_module()
    cfg = llama.CONFIGS["tiny"]
    torch.manual_seed(0)
    ref_model = llama.Llama(cfg)
    torch.manual_seed(0)
    model = aiter_dist.parallelize(llama.Llama(cfg), dist.group.WORLD, **MODES[mode])
    expected = {"fused": "all_reduce_add_rms_norm", "sp": "sequence_parallel"}
    assert model.aiter_parallel["fused_norm"] == expected.get(mode, "off")
    tokens = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    logits, ref_logits = model(tokens), ref_model(tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    if mode == "fused":
        assert aiter_dist.last_path("all_reduce_add_rms_norm") == "one_shot"
    if mode == "sp":
        assert aiter_dist.last_path("reduce_scatter_add_rms_norm") == "one_shot"
        assert aiter_dist.last_path("rms_norm_all_gather") == "one_shot"
    target = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    # The model's own loss: RoPE, SwiGLU, the vocab-parallel head and loss are aiter_dist's.
    assert model.aiter_parallel["loss"] == "vocab_parallel_cross_entropy"
    assert model.aiter_parallel["rope"] == model.aiter_parallel["swiglu"] == cfg.n_layers
    loss, ref_loss = model(tokens, target), ref_model(tokens, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert aiter_dist.last_path("vocab_parallel_cross_entropy").startswith("triton")
    loss.backward()
    ref_loss.backward()
    modules = dict(model.named_modules())
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]]
        want = _shard_of(ref_params[name].grad, owner, rank, world)
        torch.testing.assert_close(p.grad, want, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return loss.item()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tensor_parallel_llama_matches_unsharded(mode):
    losses = run_distributed(_tp_llama_vs_unsharded, 2, mode)
    assert losses[0] == losses[1]


def _block_on_its_own(rank, world):
    llama = _llama_module()
    cfg = llama.CONFIGS["tiny"]
    torch.manual_seed(0)
    ref = llama.Llama(cfg)
    torch.manual_seed(0)
    model = aiter_dist.parallelize(llama.Llama(cfg), dist.group.WORLD)
    x = torch.randn(2, 9, cfg.dim)
    torch.testing.assert_close(model.layers[1](x), ref.layers[1](x), rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    sp = aiter_dist.parallelize(llama.Llama(cfg), dist.group.WORLD, sequence_parallel=True)
    with pytest.raises(RuntimeError, match="blocks take token shards"):
        sp.layers[0](x)
    with pytest.raises(ValueError, match="sequence_parallel=True needs a model laid out"):
        aiter_dist.parallelize(nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4)), dist.group.WORLD,
                               sequence_parallel=True)
    with pytest.raises(ValueError, match="tokens are not divisible by the sequence-parallel"):
        sp(torch.randint(0, cfg.vocab_size, (1, 7)))
    return True


def test_fused_block_alone_and_sequence_parallel_errors():
    run_distributed(_block_on_its_own, 2)


def test_bad_attention_option():
    with pytest.raises(ValueError, match="attention must be 'flash' or 'keep'"):
        aiter_dist.parallelize(nn.Linear(2, 2), attention="xformers")


@pytest.mark.gpu
def test_example_llama_flash_matches_sdpa_gpu_bf16():
    llama = _llama_module()
    cfg = llama.CONFIGS["small"]
    torch.manual_seed(0)
    model = llama.Llama(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sdpa_loss = nn.functional.cross_entropy(model(tokens).float().flatten(0, 1),
                                                targets.flatten())
        aiter_dist.parallelize(model)
        flash_loss = nn.functional.cross_entropy(model(tokens).float().flatten(0, 1),
                                                 targets.flatten())
    assert aiter_dist.last_path("flash_attn").startswith("triton")  # "-tma": K, V by TMA
    torch.testing.assert_close(flash_loss, sdpa_loss, rtol=2e-3, atol=2e-3)
