"""Paged attention on the CPU with frugal's fused decode kernel (`torch.ops.frugal.paged_attention_decode`).

Decode rows (query_len == 1, no tree mask) of every request are attended in one op that reads K/V
straight through the block tables (no gather, no padding mask, fp32 softmax); everything else
(prefill chunks, speculative and tree rows) goes through the SDPA backend it extends. Chosen by
`get_attention_backend('auto', 'cpu')` when the kernels are loaded.
"""

from __future__ import annotations

import torch

from frugal.layers.attention_backends.sdpa import SdpaAttentionBackend
from frugal.layers.attention_metadata import AttentionMetadata
from frugal.layers.fused import fused_op


class CpuPagedAttentionBackend(SdpaAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self._decode_op = fused_op("paged_attention_decode")
        assert self._decode_op is not None, "the cpu attention backend needs frugal's CPU kernels"

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, reqs: list[int],
                scale: float, sliding_window: int | None) -> torch.Tensor:
        """query [len(reqs), H, D], one row per request in `reqs` -> [len(reqs), H, D]."""
        seq_lens = torch.tensor([md.seq_lens[i] for i in reqs], dtype=torch.int64)  # [B]
        block_tables = md.block_tables if len(reqs) == md.num_reqs else md.block_tables[reqs]
        return self._decode_op(query, kv_cache, block_tables, seq_lens, scale, sliding_window or 0)
