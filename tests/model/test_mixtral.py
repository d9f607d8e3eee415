"""Mixtral's sparse MoE block: same math as transformers' MixtralSparseMoeBlock and as a dense oracle
(every expert on every token), each expert run once on exactly its routed tokens, both checkpoint
layouts (per-expert and stacked) loading to the same model, and the expert-load counter."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frugal.model.arch_config import load_arch_config, parse_arch_config
from frugal.model.loader import load_model
from frugal.model.mixtral import MixtralForCausalLM, MixtralMoE
from frugal.quant.config import QuantConfig
from frugal.runner.kv_cache import allocate_kv_caches

from .helpers import run_schedule

transformers = pytest.importorskip("transformers")
BLOCK_SIZE = 16


def hf_block_and_ours(num_experts=6, top_k=2, dtype=torch.float32, hidden_act="silu"):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=num_experts,
                                        num_experts_per_tok=top_k, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=1, vocab_size=64, hidden_act=hidden_act)
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.3)
    arch = parse_arch_config({**config.to_dict(), "architectures": ["MixtralForCausalLM"]})
    ours = MixtralMoE(arch)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        for e, expert in enumerate(ours.experts):
            expert.gate_up_proj.weight.copy_(hf.experts.gate_up_proj[e])  # [2I, H]: gate rows, then up
            expert.down_proj.weight.copy_(hf.experts.down_proj[e])
    return hf.to(dtype), ours.to(dtype)


def dense_oracle(moe: MixtralMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the renormalised top-k router probabilities (0 elsewhere)."""
    probs = torch.softmax(moe.gate(x).float(), dim=-1)  # [n, E]
    kth = probs.sort(dim=-1, descending=True).values[:, moe.top_k - 1:moe.top_k]
    weights = torch.where(probs >= kth, probs, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    outputs = torch.stack([expert(x).float() for expert in moe.experts], dim=1)  # [n, E, hidden]
    return (weights[..., None] * outputs).sum(1)


@pytest.mark.parametrize("num_tokens", [1, 37])
@pytest.mark.parametrize("num_experts,top_k", [(6, 2), (4, 1), (5, 5)])
def test_moe_block_matches_transformers_and_dense_oracle(num_experts, top_k, num_tokens):
    hf, ours = hf_block_and_ours(num_experts, top_k)
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x[None])[0]
        out = ours(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, dense_oracle(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 37])  # the batch-1 decode path and the grouped path
def test_moe_block_bfloat16_matches_transformers_bit_for_bit(num_tokens):
    """Same roundings in the same order: float32 router and weights, bf16 experts, per-expert bf16 sums
    in ascending expert order. (ReLU experts: silu may run as frugal's fused kernel, rounding differently.)"""
    hf, ours = hf_block_and_ours(dtype=torch.bfloat16, hidden_act="relu")
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        out, expected = ours(x), hf(x[None])[0]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@pytest.mark.parametrize("num_tokens", [1, 5])  # 2 or 10 assignments over 8 experts: some stay idle
def test_each_expert_runs_once_on_exactly_its_tokens(num_tokens):
    _, ours = hf_block_and_ours(num_experts=8, top_k=2)
    x = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(2))
    seen: dict[int, torch.Tensor] = {}

    def record(expert):
        def hook(_module, args):
            assert expert not in seen, "an expert ran twice in one forward"
            seen[expert] = args[0].clone()
        return hook

    for e, expert in enumerate(ours.experts):
        expert.register_forward_pre_hook(record(e))
    with torch.no_grad():
        _, chosen = ours.route(x)
        ours(x)
    routed = {e: sorted(set((chosen == e).any(-1).nonzero().flatten().tolist())) for e in range(8)}
    assert set(seen) == {e for e, rows in routed.items() if rows}  # idle experts never run
    assert len(seen) < 8
    for e, rows in seen.items():
        assert torch.equal(rows, x[routed[e]])  # its tokens, each once, nothing else


def test_expert_load_counter(tiny_checkpoint):
    ckpt = tiny_checkpoint("mixtral")
    arch = load_arch_config(ckpt.path)
    model = load_model(ckpt.path, arch, torch.float32, "cpu", "reference", progress=False)
    assert isinstance(model, MixtralForCausalLM)
    caches = allocate_kv_caches(arch, 4, BLOCK_SIZE, torch.float32, "cpu")
    ids = ckpt.token_ids[:40]
    run_schedule(model, caches, [ids], [[0, 1, 2, 3]], [[40]], BLOCK_SIZE)
    assert model.expert_load().sum() == 0  # off by default
    model.set_expert_load_recording(True)
    run_schedule(model, caches, [ids], [[0, 1, 2, 3]], [[30, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], BLOCK_SIZE)
    load = model.expert_load()
    assert load.shape == (arch.num_hidden_layers, arch.num_local_experts)
    assert load.sum(1).tolist() == [len(ids) * arch.num_experts_per_tok] * arch.num_hidden_layers
    assert ((load > 0).sum(1) >= 2).all()  # every layer routes to several experts
    model.set_expert_load_recording(False)
    assert model.expert_load().sum() == 0


def write_stacked(src, dst):
    """Rewrite a per-expert Mixtral checkpoint in the stacked layout (transformers' in-memory names)."""
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    arch = load_arch_config(src)
    out = {name: t for name, t in tensors.items() if ".block_sparse_moe." not in name}
    for layer in range(arch.num_hidden_layers):
        old = f"model.layers.{layer}.block_sparse_moe"
        new = f"model.layers.{layer}.mlp"
        experts = range(arch.num_local_experts)
        out[f"{new}.gate.weight"] = tensors[f"{old}.gate.weight"]
        out[f"{new}.experts.gate_up_proj"] = torch.stack([  # [E, 2I, H]
            torch.cat([tensors[f"{old}.experts.{e}.w1.weight"], tensors[f"{old}.experts.{e}.w3.weight"]])
            for e in experts])
        out[f"{new}.experts.down_proj"] = torch.stack([tensors[f"{old}.experts.{e}.w2.weight"] for e in experts])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("quant", [None, QuantConfig.create("int8"), QuantConfig.create("int4", group_size=32)],
                         ids=["fp32", "int8", "int4"])
def test_stacked_and_per_expert_layouts_load_the_same_model(tiny_checkpoint, tmp_path, quant):
    ckpt = tiny_checkpoint("mixtral")
    stacked = write_stacked(ckpt.path, tmp_path / "stacked")
    logits = []
    for path in (ckpt.path, stacked):
        arch = load_arch_config(path)
        model = load_model(path, arch, torch.float32, "cpu", "reference", progress=False, quantization=quant,
                           kernel_backend="reference")
        caches = allocate_kv_caches(arch, 4, BLOCK_SIZE, torch.float32, "cpu")
        logits.append(run_schedule(model, caches, [ckpt.token_ids[:20]], [[0, 1]], [[12, 4, 4]], BLOCK_SIZE)[0])
    assert torch.equal(logits[0], logits[1])
    if quant is None:
        torch.testing.assert_close(logits[0], ckpt.hf_logits[40][:20], atol=1e-4, rtol=1e-4)
