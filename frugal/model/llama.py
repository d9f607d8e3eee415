"""Llama-family decoder (Llama 1/2/3/3.1/3.2, SmolLM, Mistral, Qwen2) in one class, configured by
ArchConfig flags (q/k/v and o biases, sliding window, rope scaling, tied embeddings).

The model sees a flat batch: `input_ids [num_tokens]`, `positions [num_tokens]`, one KV cache tensor
per layer and the step's AttentionMetadata. It knows nothing about requests. Parameters use the
fused layout (`qkv_proj`, `gate_up_proj`); `load_weights` maps transformers' checkpoint names onto
it and raises ModelLoadError naming any checkpoint weight the model needs but did not receive.
Subclasses reuse everything but the feed-forward block (`build_mlp`) and its checkpoint names
(`checkpoint_shards` / `param_target`): see `frugal.model.mixtral`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from frugal.errors import ModelLoadError
from frugal.layers.activation import get_act_and_mul
from frugal.layers.attention import Attention
from frugal.layers.attention_backends import AttentionBackend
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.layers.embedding import EmbeddingMethod, LMHead, VocabEmbedding
from frugal.layers.linear import Linear, LinearMethod, MergedColumnLinear, QKVLinear, copy_checked
from frugal.layers.norm import RMSNorm
from frugal.layers.rotary import RotaryEmbedding
from frugal.model.arch_config import ArchConfig

logger = logging.getLogger(__name__)

# (fused parameter fragment, checkpoint fragment, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
# Checkpoint tensors that are buffers, not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(arch.hidden_size, [arch.intermediate_size] * 2, arch.mlp_bias,
                                               linear_method)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, arch.mlp_bias, linear_method)
        self.act_fn = get_act_and_mul(arch.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [n, hidden]


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.qkv_proj = QKVLinear(arch.hidden_size, arch.head_dim, arch.num_attention_heads,
                                  arch.num_key_value_heads, arch.qkv_bias, linear_method)
        self.o_proj = Linear(arch.num_attention_heads * arch.head_dim, arch.hidden_size, arch.o_bias,
                             linear_method)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(arch.num_attention_heads, arch.head_dim, arch.head_dim**-0.5,
                              arch.num_key_value_heads, backend, arch.layer_sliding_window(layer_idx))
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        n = hidden_states.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden_states))
        q = q.reshape(n, self.num_heads, self.head_dim)  # [n, H, D]
        k = k.reshape(n, self.num_kv_heads, self.head_dim)  # [n, Hkv, D]
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        attn_out = self.attn(q, k, v, kv_cache, attn_metadata)  # [n, H*D]
        return self.o_proj(attn_out)  # [n, hidden]


class LlamaDecoderLayer(nn.Module):
    """`mlp`: the feed-forward block ([n, hidden] -> [n, hidden]); the dense gated MLP by default, a
    mixture of experts for Mixtral."""

    def __init__(self, arch: ArchConfig, layer_idx: int, backend: AttentionBackend, rotary_emb: RotaryEmbedding,
                 linear_method: LinearMethod | None = None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, backend, rotary_emb, linear_method)
        self.mlp = mlp if mlp is not None else LlamaMLP(arch, linear_method)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mlp output, residual stream before it); their sum is the layer's output."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, backend: AttentionBackend, max_position: int,
                 linear_method: LinearMethod | None = None, embedding_method: EmbeddingMethod | None = None,
                 make_mlp: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, embedding_method=embedding_method)
        # One cos/sin cache [max_position, head_dim] for all layers.
        self.rotary_emb = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling,
                                          arch.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, i, backend, self.rotary_emb, linear_method, make_mlp and make_mlp(i))
            for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """`max_position`: the longest sequence served (size of the rotary cache); defaults to
    `arch.max_position_embeddings`. `linear_method`: the QuantMethod for every projection;
    `lm_head_method` / `embedding_method`: how the LM head and the embedding table are stored."""

    def __init__(self, arch: ArchConfig, attention_backend: AttentionBackend, max_position: int | None = None,
                 linear_method: LinearMethod | None = None, lm_head_method: LinearMethod | None = None,
                 embedding_method: EmbeddingMethod | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.max_position = max_position or arch.max_position_embeddings
        self.model = LlamaModel(arch, attention_backend, self.max_position, linear_method, embedding_method,
                                lambda i: self.build_mlp(arch, i, linear_method))
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, linear_method=lm_head_method)
        if arch.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden_states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [n, hidden] -> logits [n, vocab_size] float32."""
        return self.lm_head(hidden_states)

    def build_mlp(self, arch: ArchConfig, layer_idx: int, linear_method: LinearMethod | None) -> nn.Module:
        """Layer `layer_idx`'s feed-forward block (subclasses with another MLP override this)."""
        return LlamaMLP(arch, linear_method)

    def checkpoint_shards(self, param_name: str) -> list[str]:
        """The checkpoint tensor names that load into parameter `param_name`."""
        shards = [param_name.replace(fused, ckpt) for fused, ckpt, _ in STACKED_PARAMS if f".{fused}." in param_name]
        return shards or [param_name]

    def param_target(self, name: str) -> tuple[str, object]:
        """Checkpoint tensor `name` -> (parameter name, shard id or None)."""
        for fused, ckpt, sid in STACKED_PARAMS:
            if f".{ckpt}." in name:
                return name.replace(ckpt, fused), sid
        return name, None

    def checkpoint_names(self) -> set[str]:
        """The transformers checkpoint tensor names this model needs (lm_head excluded when tied)."""
        names = set()
        for name, _ in self.named_parameters():  # tied parameters are listed once
            names.update(self.checkpoint_shards(name))
        return names

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the (already materialised) parameters.

        Returns the checkpoint names used. Raises ModelLoadError for a weight the model needs but the
        checkpoint lacks, or a shape mismatch. Unknown tensors are skipped with a warning. When the
        checkpoint has no `lm_head.weight`, the head is tied to the embedding.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        skipped: list[str] = []
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # some tied checkpoints store a copy; the embedding is authoritative
            target, shard_id = self.param_target(name)
            param = params.get(target)
            if param is None:
                skipped.append(name)
                continue
            try:
                if shard_id is not None:
                    param.weight_loader(param, tensor, shard_id)
                elif hasattr(param, "weight_loader"):
                    param.weight_loader(param, tensor)
                else:
                    copy_checked(param, tensor, "parameter")
            except ModelLoadError as exc:
                raise ModelLoadError(f"weight {name!r}: {exc}") from exc
            loaded.add(name)
        if skipped:
            logger.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(skipped),
                           skipped[:3])
        needed = self.checkpoint_names()
        if "lm_head.weight" in needed and "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
            logger.info("checkpoint has no lm_head.weight; tying the LM head to the embedding")
            self.lm_head.tie_to(self.model.embed_tokens)
            needed.discard("lm_head.weight")
        missing = sorted(needed - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint lacks weights the model needs: {shown}")
        for module in self.modules():
            method = getattr(module, "linear_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        return loaded
