"""RMSNorm, SiluAndMul, merged linear layers and their weight loaders, KV cache sizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frugal.errors import ModelLoadError
from frugal.layers.activation import SiluAndMul
from frugal.layers.linear import Linear, MergedColumnLinear, QKVLinear
from frugal.layers.norm import RMSNorm
from frugal.model.arch_config import parse_arch_config
from frugal.runner.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block


def test_rmsnorm_matches_transformers_and_fuses_residual():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(16, eps=1e-5)
    ours = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16))
        ours.weight.copy_(hf.weight)
    x, residual = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-6)  # fused kernels may reduce in another order
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, hf(x + residual))
    assert transformers is not None


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])


def test_qkv_linear_loads_shards_and_biases():
    layer = QKVLinear(hidden_size=8, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    qb, kb, vb = torch.randn(8), torch.randn(4), torch.randn(4)
    for shard, weight, bias in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        layer.weight.weight_loader(layer.weight, weight, shard)
        layer.bias.weight_loader(layer.bias, bias, shard)
    x = torch.randn(3, 8)
    out_q, out_k, out_v = layer.split(layer(x))
    torch.testing.assert_close(out_q, F.linear(x, q, qb))
    torch.testing.assert_close(out_k, F.linear(x, k, kb))
    torch.testing.assert_close(out_v, F.linear(x, v, vb))
    with pytest.raises(ModelLoadError, match=r"shard 'k'.*\(5, 8\).*\(4, 8\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(5, 8), "k")


def test_merged_column_and_plain_linear():
    layer = MergedColumnLinear(6, [4, 4])
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), torch.cat([F.linear(x, gate), F.linear(x, up)], dim=-1))
    plain = Linear(6, 3)
    w = torch.randn(3, 6)
    plain.weight.weight_loader(plain.weight, w)
    torch.testing.assert_close(plain(x), F.linear(x, w))
    assert plain.bias is None


def test_kv_cache_allocation():
    arch = parse_arch_config(dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=10))
    assert kv_cache_bytes_per_block(arch, 16, torch.bfloat16) == 2 * 3 * 16 * 2 * 16 * 2
    caches = allocate_kv_caches(arch, 5, 16, torch.float32, "cpu")
    assert len(caches) == 3 and all(c.shape == (2, 5, 16, 2, 16) and c.dtype == torch.float32 for c in caches)
