"""Architecture name (config.json `architectures[0]`) -> model class.

Every class here is constructed as `cls(arch, attention_backend, max_position=None, linear_method=None)`
and provides `forward`, `compute_logits`, `load_weights`.
"""

from __future__ import annotations

from torch import nn

from frugal.errors import ModelLoadError
from frugal.model.arch_config import SUPPORTED_ARCHITECTURES
from frugal.model.llama import LlamaForCausalLM
from frugal.model.mixtral import MixtralForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,      # Llama 1/2/3/3.1/3.2, SmolLM
    "MistralForCausalLM": LlamaForCausalLM,    # + sliding window
    "MixtralForCausalLM": MixtralForCausalLM,  # + sparse mixture-of-experts MLP
    "Qwen2ForCausalLM": LlamaForCausalLM,      # + q/k/v bias
}
assert set(_MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES), "arch_config and registry disagree"


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return _MODEL_CLASSES[architecture]
    except KeyError:
        raise ModelLoadError(f"unknown architecture {architecture!r}; supported architectures: "
                             f"{', '.join(supported_architectures())}") from None
