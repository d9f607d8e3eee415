"""Bytes per decoded token: every dense weight once, a mixture of experts only its routed share."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_checkpoint

from frugal.bench.roofline import decode_bytes_per_token
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_moe_counts_only_the_routed_experts(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "moe", "mixtral")
    arch = load_arch_config(path)
    model = load_model(path, arch, torch.float32, "cpu", "reference", progress=False)
    moe_layers = [layer.mlp for layer in model.model.layers]
    expert_bytes = sum(_nbytes(moe.experts.parameters()) for moe in moe_layers)
    embedding = model.model.embed_tokens
    everything = _nbytes({id(p): p for p in model.parameters()}.values())  # tied head counted once
    counted = decode_bytes_per_token(model, kv_bytes_per_token_position=0, mean_context=0)
    top_k, num_experts = arch.num_experts_per_tok, arch.num_local_experts
    assert 0 < top_k < num_experts
    # The tied table is read whole by the LM head; the experts only top_k / num_experts of the time.
    assert counted["weight_bytes"] == everything - expert_bytes + expert_bytes * top_k // num_experts
    assert counted["embedding_row_bytes"] == _nbytes(embedding.parameters()) // arch.vocab_size


def test_dense_model_counts_every_weight(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "dense", "llama")
    arch = load_arch_config(path)
    model = load_model(path, arch, torch.float32, "cpu", "reference", progress=False)
    counted = decode_bytes_per_token(model, kv_bytes_per_token_position=100, mean_context=3)
    everything = _nbytes({id(p): p for p in model.parameters()}.values())
    untied_embedding = 0 if arch.tie_word_embeddings else _nbytes(model.model.embed_tokens.parameters())
    assert counted["weight_bytes"] == everything - untied_embedding
    assert counted["kv_cache_bytes"] == 300
