"""ArchConfig parsing: transformers 4 and 5 config layouts, per-family flags, defaults."""

from __future__ import annotations

import pytest

from frugal.errors import ModelLoadError
from frugal.model.arch_config import parse_arch_config
from frugal.model.registry import get_model_class, supported_architectures

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def parse(architecture="LlamaForCausalLM", **fields):
    return parse_arch_config({"architectures": [architecture], **BASE, **fields})


def test_defaults():
    arch = parse()
    assert arch.num_key_value_heads == 4 and arch.head_dim == 16
    assert arch.rope_theta == 10000.0 and arch.rope_scaling is None and arch.rope_type == "default"
    assert not (arch.qkv_bias or arch.o_bias or arch.mlp_bias or arch.tie_word_embeddings)
    assert arch.sliding_window is None and arch.eos_token_ids == () and arch.torch_dtype is None


def test_transformers4_rope_layout():
    arch = parse(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0},
                 torch_dtype="bfloat16", eos_token_id=[128001, 128009], head_dim=32)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert arch.torch_dtype == "bfloat16" and arch.eos_token_ids == (128001, 128009) and arch.head_dim == 32


def test_transformers5_rope_layout():
    arch = parse(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, dtype="float16", eos_token_id=2)
    assert arch.rope_theta == 1e6 and arch.rope_scaling is None
    assert arch.torch_dtype == "float16" and arch.eos_token_ids == (2,)
    arch = parse(rope_parameters={"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert arch.rope_type == "llama3" and "rope_theta" not in arch.rope_scaling
    with pytest.raises(ModelLoadError, match="low_freq_factor"):
        parse(rope_parameters={"rope_type": "llama3", "factor": 8.0})


def test_family_flags():
    assert parse("Qwen2ForCausalLM").qkv_bias and not parse("Qwen2ForCausalLM").o_bias
    llama = parse(attention_bias=True, mlp_bias=True)
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    assert parse("MistralForCausalLM", sliding_window=4096).layer_sliding_window(1) == 4096
    assert parse("MistralForCausalLM", sliding_window=None).sliding_window is None
    assert parse("Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=False).sliding_window is None
    qwen = parse("Qwen2ForCausalLM", sliding_window=8, use_sliding_window=True,
                 layer_types=["full_attention", "sliding_attention"])
    assert qwen.layer_sliding_window(0) is None and qwen.layer_sliding_window(1) == 8


def test_invalid_fields():
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        parse(num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="'hidden_size' must be an integer"):
        parse(hidden_size="64")
    with pytest.raises(ModelLoadError, match="no 'architectures'"):
        parse_arch_config(dict(BASE))


def test_registry():
    assert set(supported_architectures()) == {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                                              "Qwen2ForCausalLM"}
    with pytest.raises(ModelLoadError, match="unknown architecture 'Foo'"):
        get_model_class("Foo")


def test_gated_activations():
    assert parse().hidden_act == "silu"
    for name in ("relu", "gelu", "gelu_pytorch_tanh"):
        assert parse(hidden_act=name).hidden_act == name
    with pytest.raises(ModelLoadError, match="unsupported hidden_act 'swish'"):
        parse(hidden_act="swish")


def test_mixtral_fields():
    arch = parse("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    assert (arch.num_local_experts, arch.num_experts_per_tok, arch.sliding_window) == (8, 2, None)
    assert parse("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2,
                 sliding_window=4096).layer_sliding_window(1) == 4096
    assert parse().num_local_experts == 0 and parse().num_experts_per_tok == 0  # dense
    assert parse(num_local_experts=8).num_local_experts == 0  # only Mixtral reads the MoE fields
    with pytest.raises(ModelLoadError, match="num_experts_per_tok"):
        parse("MixtralForCausalLM", num_local_experts=8)
    with pytest.raises(ModelLoadError, match=r"num_experts_per_tok \(3\) must be between 1 and num_local_experts"):
        parse("MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=3)
