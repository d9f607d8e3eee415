"""AttentionBackend: paged attention over one layer's KV cache for a flat token batch.

Contract (see `AttentionMetadata` for the batch layout):
- `query [num_tokens, num_heads, head_dim]`; `kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]`
  already holds K/V for positions `0 .. seq_lens[i] - 1` of every request (this step's included).
- Query row j of request i sits at position `seq_lens[i] - query_lens[i] + j` and sees key position
  p iff p <= its position (causal), and, with a sliding window W, p > its position - W (transformers'
  convention: W keys including itself). With a tree mask, the rows see the whole earlier context and,
  among this step's tokens, exactly those the tree mask allows (the window still applies, by row
  position).
- A backend never reads a cache slot at or past `seq_lens[i]` into the result: unwritten slots may
  hold garbage (NaN included) since caches are allocated with torch.empty on CPU.
- Output `[num_tokens, num_heads * head_dim]` in the query dtype; softmax is computed in float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from frugal.layers.attention_metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: str = "base"

    @abstractmethod
    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata,
        scale: float, sliding_window: int | None = None,
    ) -> torch.Tensor:
        """-> [num_tokens, num_heads * head_dim]."""


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of one request for positions 0 .. seq_len-1: each [seq_len, num_kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks]
    key = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # [seq_len, num_kv_heads, head_dim]
    value = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return key, value


def build_attention_mask(
    query_len: int, seq_len: int, tree_mask: torch.Tensor | None, sliding_window: int | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """-> bool [query_len, seq_len], True = may attend (see the module docstring)."""
    context_len = seq_len - query_len
    q_pos = torch.arange(context_len, seq_len, device=device)[:, None]  # [query_len, 1]
    k_pos = torch.arange(seq_len, device=device)[None, :]  # [1, seq_len]
    mask = k_pos <= q_pos
    if tree_mask is not None:
        assert tree_mask.shape == (query_len, query_len), (tree_mask.shape, query_len)
        mask[:, context_len:] = tree_mask.to(device=device, dtype=torch.bool)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask
