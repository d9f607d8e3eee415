"""The decoder being trained: a `transformers` LlamaForCausalLM or MixtralForCausalLM built from a
ModelSpec, so the checkpoint the trainer saves is the Hugging Face layout by construction (the very
classes `transformers` loads it with), and the loss that trains it.

The loss is chosen once, at construction: next-token cross-entropy, plus for Mixtral the
Switch-Transformer load-balancing loss (Fedus et al., 2021) scaled by `router_aux_loss_coef`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from frugal.errors import ConfigError
from frugal.train.config import ModelSpec
from frugal.train.tokenizer import BOS_ID, EOS_ID, PAD_ID

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("training needs `transformers`: pip install 'frugal[train]'") from exc
    return transformers


def build_hf_config(spec: ModelSpec, vocab_size: int):
    """The transformers config for `spec` with the zoo tokenizer's special ids."""
    transformers = _transformers()
    common = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, hidden_act=spec.hidden_act,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps, tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        architectures=[spec.hf_architecture],
    )
    if spec.architecture == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=spec.num_local_experts,
                                          num_experts_per_tok=spec.num_experts_per_tok,
                                          router_aux_loss_coef=spec.router_aux_loss_coef, sliding_window=None)
    return transformers.LlamaConfig(**common)


def build_model(spec: ModelSpec, vocab_size: int, seed: int) -> nn.Module:
    """A freshly initialised float32 model; the same seed gives the same weights."""
    transformers = _transformers()
    torch.manual_seed(seed)
    config = build_hf_config(spec, vocab_size)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied ones once); for MoE also the parameters active per token."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    counts = {"total": total, "non_embedding": total - embedding * (1 if config.tie_word_embeddings else 2)}
    if getattr(config, "num_local_experts", None):
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        counts["active"] = total - experts + experts * config.num_experts_per_tok // config.num_local_experts
    return counts


def cross_entropy_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; inputs and targets [batch, seq_len]."""
    logits = model(input_ids=inputs, use_cache=False).logits  # [batch, seq_len, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_moe_loss(aux_coef: float) -> LossFn:
    def moe_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=inputs, use_cache=False, output_router_logits=True)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        return loss + aux_coef * out.aux_loss.float()
    return moe_loss


def training_loss(spec: ModelSpec) -> LossFn:
    return make_moe_loss(spec.router_aux_loss_coef) if spec.architecture == "mixtral" else cross_entropy_loss


def eval_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, number of tokens) — the language-modelling loss only, no aux terms."""
    logits = model(input_ids=inputs, use_cache=False).logits
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return nll.item(), targets.numel()
