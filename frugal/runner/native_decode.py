"""The CPU decode step in one C++ call (`ModelConfig.native_decode`, on by default; `--no-native-decode`).

A batch-1 decode step of a small model is as much Python as kernels: ~12 module calls, views and
splits around ~11 kernel calls per layer. `NativeDecode` hands decode-only steps (one query token per
request, no tree masks) of a Llama-family model to `DecodeStack` (csrc/decode_stack.cpp), which holds
the layers' own weight tensors and calls the same kernels, in the same order, on the same values as the
eager modules: its hidden states equal the eager model's exactly (tests/runner/test_native_decode.py).
The embedding lookup stays in Python (one call); prefill chunks, mixed batches, speculative and tree
steps run the eager model, where kernel time dominates.

Unlike `torch.compile` (runner/compiled_decode.py) there is nothing to trace or compile at run time:
the stack is built once at engine construction, in about a millisecond. It holds references to the
weight tensors and reads the module structure only then: in-place weight updates reach it, but code that
swaps modules or parameters after construction must build a new NativeDecode. A model qualifies when every
projection's LinearMethod reports a `native_spec` (frugal's CPU kernels or F.linear), its MLP is the
dense SwiGLU, its norms are RMSNorm and attention runs on the 'cpu' backend; `native_decode_unsupported`
says why not otherwise, and the engine then runs eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from frugal.layers.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def _linear(ops, module: nn.Module):
    """The C++ NativeLinear of a Linear module, or None when its method has no native spec."""
    spec = module.linear_method.native_spec(module)
    if spec is None:
        return None
    return ops.NativeLinear(spec.kind, spec.weight, spec.scales, spec.zeros, getattr(module, "bias", None),
                            spec.group_size, spec.max_rows)


def native_decode_unsupported(model: nn.Module) -> str | None:
    """None when `model`'s decode steps can run as one DecodeStack call here, else why not."""
    from frugal.layers.activation import SiluAndMul
    from frugal.layers.attention_backends import CpuPagedAttentionBackend
    from frugal.layers.norm import RMSNorm
    from frugal.model.llama import LlamaForCausalLM, LlamaMLP
    from frugal.quant.kernels import cpu_kernels

    if cpu_kernels() is None:
        return "frugal's CPU kernels are not loaded"
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family decoder"
    body = model.model
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if body.rotary_emb.cos_cache.shape[1] != model.arch.head_dim:
        return "partial rotary embeddings"
    for index, layer in enumerate(body.layers):
        attn = layer.self_attn
        if not isinstance(attn.attn.backend, CpuPagedAttentionBackend):
            return "the native decode step needs the 'cpu' attention backend"
        if type(layer.mlp) is not LlamaMLP or not isinstance(layer.mlp.act_fn, SiluAndMul):
            return f"layer {index}'s feed-forward block is not the dense SwiGLU MLP"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(norm) is RMSNorm for norm in norms):
            return f"layer {index}'s norms are not RMSNorm"
        for name, proj in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                           ("gate_up_proj", layer.mlp.gate_up_proj), ("down_proj", layer.mlp.down_proj)):
            if proj.linear_method.native_spec(proj) is None:
                return f"layer {index}'s {name} ({type(proj.linear_method).__name__}) has no native kernel"
    return None


def build_decode_stack(model: nn.Module):
    """The DecodeStack of a model `native_decode_unsupported` accepts (sharing its weight tensors)."""
    from frugal.quant.kernels import cpu_kernels

    ops = cpu_kernels()
    body, arch = model.model, model.arch
    first = body.layers[0].self_attn.attn
    stack = ops.DecodeStack(first.num_heads, first.num_kv_heads, first.head_dim, first.scale,
                            body.rotary_emb.cos_cache, body.rotary_emb.sin_cache, body.norm.weight, body.norm.eps)
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert (attn.attn.num_heads, attn.attn.num_kv_heads, attn.attn.head_dim, attn.attn.scale) == (
            first.num_heads, first.num_kv_heads, first.head_dim, first.scale), "layers differ in attention shape"
        stack.add_layer(_linear(ops, attn.qkv_proj), _linear(ops, attn.o_proj), _linear(ops, mlp.gate_up_proj),
                        _linear(ops, mlp.down_proj), layer.input_layernorm.weight, layer.input_layernorm.eps,
                        layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps,
                        attn.attn.sliding_window or 0)
    head = _linear(ops, model.lm_head)
    if head is not None:
        stack.set_lm_head(head)
    logger.debug("native decode stack: %d layers of %s", stack.num_layers, arch.architecture)
    return stack


class NativeDecode:
    """Callable like the model (`(input_ids, positions, kv_caches, attn_metadata) -> hidden_states`):
    decode-only steps run the DecodeStack, every other step the eager model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack = build_decode_stack(model)
        self.num_native_steps = 0  # decode steps the stack ran (the rest ran eagerly)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 attn_metadata: AttentionMetadata) -> torch.Tensor:
        md = attn_metadata
        if not md.is_decode_only or md.num_tokens != input_ids.shape[0]:
            return self.model(input_ids, positions, kv_caches, md)
        hidden = self.model.model.embed_tokens(input_ids)  # [n, hidden]
        seq_lens = torch.tensor(md.seq_lens, dtype=torch.int64)  # [n]
        self.num_native_steps += 1
        return self.stack.forward(hidden, positions, kv_caches, md.slot_mapping, md.block_tables, seq_lens)

    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """hidden_rows [n, hidden] -> logits [n, vocab] float32, as `model.compute_logits` (same kernel,
        same rounding), for every step: prefill's last rows too."""
        if not self.stack.has_lm_head:
            return self.model.compute_logits(hidden_rows)
        return self.stack.logits(hidden_rows)
