"""ArchConfig: the model shape read from a checkpoint's `config.json`, validated once.

Everything below `model/` that needs the architecture (layer sizes, rope, biases, sliding window)
reads it from this frozen dataclass, never from the raw JSON. Both the transformers 4 layout
(`rope_theta` + `rope_scaling`, `torch_dtype`) and the transformers 5 layout (`rope_parameters`,
`dtype`) are accepted. Invariants after parsing:

- `num_attention_heads % num_key_value_heads == 0`;
- `rope_scaling` is None for plain RoPE, else a dict whose `rope_type` is one of
  `SUPPORTED_ROPE_TYPES` minus 'default', holding that type's parameters;
- `sliding_window` is None when the checkpoint disables it; `layer_sliding_window(i)` gives the window
  a given layer actually uses (Qwen2 applies it to some layers only);
- `eos_token_ids` is a tuple (possibly empty);
- `num_local_experts` is 0 for a dense model; for a mixture of experts (Mixtral) it is >= 1 and
  `1 <= num_experts_per_tok <= num_local_experts`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugal.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Gated MLP activations (frugal.layers.activation.GATED_ACTIVATIONS): SwiGLU, ReGLU, GeGLU.
SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_pytorch_tanh")
_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Per-layer attention kind ('full_attention' / 'sliding_attention') when the checkpoint names it.
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    # Mixture of experts (Mixtral): experts per layer (0 = dense MLP) and experts routed per token.
    num_local_experts: int = 0
    num_experts_per_tok: int = 0

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The sliding window layer `layer_idx` uses, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window


def load_arch_config(model_dir: Path | str) -> ArchConfig:
    """Read `model_dir/config.json`. Raises ModelLoadError naming the path and the problem."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: config.json not found; is {model_dir} a model checkpoint directory?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return parse_arch_config(raw)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def parse_arch_config(raw: dict[str, Any]) -> ArchConfig:
    """Build an ArchConfig from a config.json dict. Raises ModelLoadError (without the path)."""
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        raise ModelLoadError(
            f"config has no 'architectures' entry; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unknown architecture {architecture!r}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for name in _REQUIRED_FIELDS:
        if raw.get(name) is None:
            raise ModelLoadError(f"missing required field {name!r}")

    num_heads = _int(raw, "num_attention_heads")
    num_kv_heads = _int(raw, "num_key_value_heads") if raw.get("num_key_value_heads") is not None else num_heads
    hidden_size = _int(raw, "hidden_size")
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ModelLoadError(
            f"num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})")
    head_dim = _int(raw, "head_dim") if raw.get("head_dim") is not None else hidden_size // num_heads

    hidden_act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"unsupported hidden_act {hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

    rope_theta, rope_scaling = _parse_rope(raw)
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    attention_bias = bool(raw.get("attention_bias", False))

    sliding_window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False or (sliding_window is not None and int(sliding_window) <= 0):
        sliding_window = None
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        layer_types = tuple(str(t) for t in layer_types)
        if len(layer_types) != _int(raw, "num_hidden_layers"):
            raise ModelLoadError(
                f"layer_types has {len(layer_types)} entries but num_hidden_layers is {raw['num_hidden_layers']}")

    num_experts, experts_per_tok = _parse_moe(raw, architecture)

    eos = raw.get("eos_token_id")
    eos_token_ids = () if eos is None else tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
    dtype = raw.get("torch_dtype", raw.get("dtype"))

    return ArchConfig(
        architecture=architecture,
        model_type=str(raw.get("model_type", "")),
        hidden_size=hidden_size,
        intermediate_size=_int(raw, "intermediate_size"),
        num_hidden_layers=_int(raw, "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=_int(raw, "vocab_size"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        hidden_act=hidden_act,
        sliding_window=None if sliding_window is None else int(sliding_window),
        layer_types=layer_types,
        bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
        eos_token_ids=eos_token_ids,
        torch_dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_tok,
    )


def _parse_moe(raw: dict[str, Any], architecture: str) -> tuple[int, int]:
    """-> (num_local_experts, num_experts_per_tok); (0, 0) for a dense architecture."""
    if architecture != "MixtralForCausalLM":
        return 0, 0
    for name in ("num_local_experts", "num_experts_per_tok"):
        if raw.get(name) is None:
            raise ModelLoadError(f"missing required field {name!r}")
    num_experts, per_tok = _int(raw, "num_local_experts"), _int(raw, "num_experts_per_tok")
    if num_experts < 1 or not 1 <= per_tok <= num_experts:
        raise ModelLoadError(f"num_experts_per_tok ({per_tok}) must be between 1 and num_local_experts "
                             f"({num_experts})")
    return num_experts, per_tok


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ModelLoadError(f"field {name!r} must be an integer, got {value!r}")
    return int(value)


def _parse_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """-> (rope_theta, rope_scaling or None). Accepts `rope_scaling` (old) and `rope_parameters` (new);
    the old `type` key is read as `rope_type`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"rope parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError("per-layer-type rope parameters are not supported")
    rope_theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return rope_theta, None
    scaling = {k: v for k, v in params.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = rope_type
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in required[rope_type]:
        if key not in scaling:
            raise ModelLoadError(f"rope scaling type {rope_type!r} needs {key!r}")
    return rope_theta, scaling
