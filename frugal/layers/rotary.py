"""Rotary position embedding (RoPE, Su et al. 2021), neox/"rotate half" style as in Llama.

`RotaryEmbedding` owns a cos/sin cache `[max_position, rotary_dim]` in float32, built once at
construction (on the CPU, explicitly, so that building the model on the meta device still yields a
real cache; it moves with `.to(device)`). `forward(positions, q, k)` looks the rows up by absolute
position, so a token's rotation depends only on its position — never on the batch around it, which
is what lets cached K stay valid across steps.

Scaling variants, matching transformers' `ROPE_INIT_FUNCTIONS`:
- 'linear': positions divided by `factor` (inv_freq / factor).
- 'llama3': Llama 3.1 wavelength-dependent interpolation.
- 'dynamic' (NTK): transformers recomputes the frequencies from the *current* sequence length
  once it exceeds `max_position_embeddings`. A paged cache needs one fixed rotation per position,
  so we compute the frequencies once, as transformers would for a sequence of length
  `max_position` (the longest sequence this engine serves). Consequently a sequence of exactly that
  length (or any length when `max_position <= max_position_embeddings`, where the formula reduces
  to plain RoPE) matches transformers exactly; shorter sequences past `max_position_embeddings` see
  the frequencies of the longest one (the same choice as vLLM, with a different reference length).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from frugal.layers.fused import fused_op


def compute_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int, max_position: int,
) -> torch.Tensor:
    """-> inv_freq [head_dim // 2] float32 on the CPU, as transformers computes it."""
    rope_type = "default" if rope_scaling is None else rope_scaling["rope_type"]
    base = rope_theta
    if rope_type == "dynamic":
        factor = float(rope_scaling["factor"])
        seq_len = max(max_position, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)  # [head_dim // 2]
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type not in ("default", "dynamic"):
        raise ValueError(f"unsupported rope type {rope_type!r}")
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q `[num_tokens, num_heads, head_dim]` and k `[num_tokens, num_kv_heads, head_dim]`
    given `positions [num_tokens]` (all < max_position)."""

    def __init__(
        self, head_dim: int, max_position: int, rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        mpe = max_position if max_position_embeddings is None else max_position_embeddings
        inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling, mpe, max_position)
        t = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)
        self._rotary = fused_op("rotary_embedding")  # one op (frugal's CPU kernels)
        self._forward_method = self._forward_fused if self._rotary is not None else self._forward_native

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> rotated (query, key), new tensors of the same shapes."""
        return self._forward_method(positions, query, key)

    def _forward_fused(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        return self._rotary(positions, query, key, self.cos_cache, self.sin_cache)

    def _forward_native(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The product is taken in the activation dtype, as transformers does.
        cos = self.cos_cache[positions].unsqueeze(1).to(query.dtype)  # [num_tokens, 1, head_dim]
        sin = self.sin_cache[positions].unsqueeze(1).to(query.dtype)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        return query, key

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}"
