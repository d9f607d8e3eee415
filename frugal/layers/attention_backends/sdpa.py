"""Paged attention through `torch.nn.functional.scaled_dot_product_attention`.

Requests are split in two groups each step:
- decode rows (query_len == 1, no tree mask): K/V of all of them are gathered through the block
  tables into one padded `[num_decodes, num_kv_heads, max_seq_len, head_dim]` batch and attended in
  a single SDPA call with a key-padding (and sliding-window) mask. Gathered slots past a request's
  `seq_len` are zeroed before use, so garbage in unwritten cache slots never reaches the result;
- every other request (prefill chunks, speculative/tree rows): one SDPA call each, with
  `is_causal=True` when the chunk is the whole sequence and no extra mask applies, else an explicit
  boolean mask from `build_attention_mask`.
GQA uses SDPA's `enable_gqa` where available (torch >= 2.5), else repeats KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frugal.layers.attention_backends.base import AttentionBackend, build_attention_mask, gather_kv
from frugal.layers.attention_metadata import AttentionMetadata

_HAS_ENABLE_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          is_causal: bool, scale: float) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> [B, H, Lq, D]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads == num_kv_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if _HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


class SdpaAttentionBackend(AttentionBackend):
    name = "sdpa"

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata,
        scale: float, sliding_window: int | None = None,
    ) -> torch.Tensor:
        md = attn_metadata
        num_tokens, num_heads, head_dim = query.shape
        if md.is_decode_only and md.num_tokens == num_tokens:
            return self._decode(query, kv_cache, md, list(range(md.num_reqs)), scale, sliding_window).view(
                num_tokens, num_heads * head_dim)
        out = query.new_zeros(num_tokens, num_heads, head_dim)  # rows past md.num_tokens (padding) stay 0
        decode_reqs = [i for i in range(md.num_reqs) if md.query_lens[i] == 1
                       and (md.tree_masks is None or md.tree_masks[i] is None)]
        if decode_reqs:
            rows = torch.tensor([md.query_start_loc[i] for i in decode_reqs], device=query.device)
            out[rows] = self._decode(query[rows], kv_cache, md, decode_reqs, scale, sliding_window)
        decode_set = set(decode_reqs)
        for i in range(md.num_reqs):
            if i not in decode_set:
                start, end = md.query_start_loc[i], md.query_start_loc[i + 1]
                out[start:end] = self._prefill(query[start:end], kv_cache, md, i, scale, sliding_window)
        return out.view(num_tokens, num_heads * head_dim)

    def _prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, i: int,
                 scale: float, sliding_window: int | None) -> torch.Tensor:
        """query [q_len, H, D] of request i -> [q_len, H, D]."""
        query_len, seq_len = query.shape[0], md.seq_lens[i]
        key, value = gather_kv(kv_cache, md.block_tables[i], seq_len)  # [seq_len, Hkv, D]
        tree_mask = md.tree_masks[i] if md.tree_masks is not None else None
        mask, is_causal = None, False
        if tree_mask is None and (sliding_window is None or sliding_window >= seq_len):
            if query_len == seq_len:
                is_causal = query_len > 1
            elif query_len > 1:
                mask = build_attention_mask(query_len, seq_len, None, None, query.device)
        else:
            mask = build_attention_mask(query_len, seq_len, tree_mask, sliding_window, query.device)
        out = _sdpa(query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0),
                    value.transpose(0, 1).unsqueeze(0), mask, is_causal, scale)  # [1, H, q_len, D]
        return out[0].transpose(0, 1)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, reqs: list[int],
                scale: float, sliding_window: int | None) -> torch.Tensor:
        """query [len(reqs), H, D], one row per request in `reqs` -> [len(reqs), H, D]."""
        device = query.device
        block_size = kv_cache.shape[2]
        seq_lens = torch.tensor([md.seq_lens[i] for i in reqs], device=device)  # [B]
        max_seq_len = max(md.seq_lens[i] for i in reqs)
        max_blocks = -(-max_seq_len // block_size)
        block_tables = md.block_tables[reqs, :max_blocks].to(device)  # [B, max_blocks]
        key = kv_cache[0, block_tables].flatten(1, 2)[:, :max_seq_len]  # [B, max_seq_len, Hkv, D]
        value = kv_cache[1, block_tables].flatten(1, 2)[:, :max_seq_len]
        k_pos = torch.arange(max_seq_len, device=device)[None, :]  # [1, max_seq_len]
        valid = k_pos < seq_lens[:, None]  # [B, max_seq_len]
        zero = torch.zeros((), dtype=key.dtype, device=device)
        key = torch.where(valid[:, :, None, None], key, zero)
        value = torch.where(valid[:, :, None, None], value, zero)
        if sliding_window is not None:
            valid = valid & (k_pos > seq_lens[:, None] - 1 - sliding_window)
        out = _sdpa(query.unsqueeze(2), key.transpose(1, 2), value.transpose(1, 2),
                    valid[:, None, None, :], False, scale)  # [B, H, 1, D]
        return out.squeeze(2)
