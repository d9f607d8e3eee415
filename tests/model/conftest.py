"""Tiny random-weight checkpoints built with transformers, saved as safetensors once per session,
with transformers' own full-sequence logits as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
_DYNAMIC = dict(max_position_embeddings=32, rope_scaling=dict(rope_type="dynamic", factor=2.0))

# name -> (config class name, overrides, our max_position (None = checkpoint's), prompt lengths)
MODEL_CASES = {
    "llama": ("LlamaConfig", {}, None, (5, 40)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), None, (5, 40)),
    "llama_mqa_bias": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True), None, (5, 40)),
    "llama3_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
                    None, (5, 40)),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), None, (5, 40)),
    # Dynamic NTK: our frequencies are fixed for max_position; transformers' depend on the sequence
    # length, so they agree for a sequence of exactly max_position tokens ...
    "llama_dynamic_rope": ("LlamaConfig", _DYNAMIC, 40, (40,)),
    # ... and for any length within max_position_embeddings when max_position does not exceed it.
    "llama_dynamic_rope_short": ("LlamaConfig", _DYNAMIC, None, (5, 20)),
    "mistral_swa": ("MistralConfig", dict(sliding_window=8), None, (5, 40)),
    "qwen2": ("Qwen2Config", {}, None, (5, 40)),
    "qwen2_swa": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), None, (5, 40)),
    # ReGLU / GeGLU MLPs: relu(gate) * up (ReluLLaMA), gelu(gate) * up.
    "llama_relu": ("LlamaConfig", dict(hidden_act="relu"), None, (5, 40)),
    "llama_gelu_tanh": ("LlamaConfig", dict(hidden_act="gelu_pytorch_tanh"), None, (5, 40)),
    # Sparse mixture of experts: 4 experts top-2 with tied embeddings (the zoo's moe shape), and 5 experts
    # top-3 with a sliding window.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True), None,
                (5, 40)),
    "mixtral_swa": ("MixtralConfig", dict(num_local_experts=5, num_experts_per_tok=3, sliding_window=8), None,
                    (5, 40)),
}
MAX_LEN = 40


@dataclass
class TinyCheckpoint:
    name: str
    path: Path
    max_position: int | None
    lengths: tuple[int, ...]
    token_ids: list[int]            # MAX_LEN tokens; a prompt of length L is token_ids[:L]
    hf_logits: dict[int, torch.Tensor]  # L -> transformers' logits [L, vocab] for token_ids[:L]
    other_ids: list[int]            # a second prompt of length lengths[0]
    other_logits: torch.Tensor      # transformers' logits for other_ids


def _randomize(model: torch.nn.Module) -> None:
    """Give biases and norm weights non-trivial values so that loading them is actually tested."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".gate.weight"):  # MoE router: decisive routing, no near-ties in top-k
                param.mul_(20.0)


def build_checkpoint(name: str, directory: Path, **save_kwargs) -> TinyCheckpoint:
    transformers = pytest.importorskip("transformers")
    config_cls, overrides, max_position, lengths = MODEL_CASES[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    _randomize(model)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    generator = torch.Generator().manual_seed(1)
    token_ids = torch.randint(0, config.vocab_size, (MAX_LEN,), generator=generator).tolist()
    hf_logits = {}
    with torch.no_grad():
        for length in lengths:
            hf_logits[length] = model(torch.tensor([token_ids[:length]])).logits[0].float()
        other_ids = torch.randint(0, config.vocab_size, (lengths[0],), generator=generator).tolist()
        other_logits = model(torch.tensor([other_ids])).logits[0].float()
    return TinyCheckpoint(name, Path(directory), max_position, lengths, token_ids, hf_logits, other_ids,
                          other_logits)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> TinyCheckpoint, built once per session."""
    cache: dict[str, TinyCheckpoint] = {}

    def get(name: str) -> TinyCheckpoint:
        if name not in cache:
            cache[name] = build_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get
