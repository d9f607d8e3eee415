"""Reference paged attention: plain PyTorch, one request at a time, float32 throughout.

The oracle every faster backend is tested against: gather K/V through the block table for positions
0..seq_len-1, repeat KV heads for GQA, apply the mask from `build_attention_mask`, softmax in fp32.
"""

from __future__ import annotations

import torch

from frugal.layers.attention_backends.base import AttentionBackend, build_attention_mask, gather_kv
from frugal.layers.attention_metadata import AttentionMetadata


class ReferenceAttentionBackend(AttentionBackend):
    name = "reference"

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata,
        scale: float, sliding_window: int | None = None,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        out = query.new_zeros(num_tokens, num_heads, head_dim)  # rows past md.num_tokens (padding) stay 0
        md = attn_metadata
        for i in range(md.num_reqs):
            start, end = md.query_start_loc[i], md.query_start_loc[i + 1]
            seq_len = md.seq_lens[i]
            assert end - start == md.query_lens[i] and md.query_lens[i] <= seq_len
            key, value = gather_kv(kv_cache, md.block_tables[i], seq_len)  # [seq_len, Hkv, D]
            key = key.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # [seq_len, H, D]
            value = value.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
            q = query[start:end].float()  # [q_len, H, D]
            scores = torch.einsum("qhd,khd->hqk", q, key) * scale  # [H, q_len, seq_len]
            tree_mask = md.tree_masks[i] if md.tree_masks is not None else None
            mask = build_attention_mask(end - start, seq_len, tree_mask, sliding_window, query.device)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start:end] = torch.einsum("hqk,khd->qhd", probs, value).to(query.dtype)
        return out.view(num_tokens, num_heads * head_dim)
