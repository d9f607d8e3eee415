"""Attention layer over a paged KV cache (PagedAttention, Kwon et al. 2023).

`Attention.forward(q, k, v, kv_cache, attn_metadata)` first writes this step's k/v into the layer's
cache at `attn_metadata.slot_mapping` (flat slot = block_id * block_size + offset), then lets the
backend attend over the cache. The layer holds no per-request state: all of it arrives in the
metadata, so the same module serves any mix of prefill chunks, decodes and speculative rows.
"""

from __future__ import annotations

import torch
from torch import nn

from frugal.layers.attention_backends import AttentionBackend
from frugal.layers.attention_metadata import AttentionMetadata, DecodeTensors


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] -> kv_cache[0/1] at flat slots `slot_mapping`."""
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    num_slots = slot_mapping.shape[0]
    key_cache = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
    value_cache = kv_cache[1].view(-1, num_kv_heads, head_dim)
    key_cache.index_copy_(0, slot_mapping, key[:num_slots].to(kv_cache.dtype))
    value_cache.index_copy_(0, slot_mapping, value[:num_slots].to(kv_cache.dtype))


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata | DecodeTensors) -> torch.Tensor:
        """query [n, H*D] or [n, H, D]; key/value [n, Hkv*D] or [n, Hkv, D] -> [n, H*D]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if isinstance(attn_metadata, DecodeTensors):  # the compiled decode step (cpu backend)
            return self._decode_ops(query, key, value, kv_cache, attn_metadata)
        write_kv_cache(key, value, kv_cache, attn_metadata.slot_mapping)
        return self.backend.forward(query, kv_cache, attn_metadata, self.scale, self.sliding_window)

    def _decode_ops(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                    md: DecodeTensors) -> torch.Tensor:
        """The cpu backend's decode path as two dispatcher ops (traceable by torch.compile)."""
        torch.ops.frugal.write_kv_cache(kv_cache, key, value, md.slot_mapping)
        out = torch.ops.frugal.paged_attention_decode(query, kv_cache, md.block_tables, md.seq_lens, self.scale,
                                                      self.sliding_window or 0)  # [n, H, D]
        return out.view(query.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"backend={self.backend.name}, sliding_window={self.sliding_window}")
