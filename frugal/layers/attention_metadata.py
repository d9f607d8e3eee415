"""AttentionMetadata: how this step's flat token batch maps onto requests and KV cache slots.

Built once per step by the runner and passed explicitly to every attention layer.

Layout of the flat batch: request i owns query rows `query_start_loc[i] : query_start_loc[i+1]`,
which sit at sequence positions `seq_lens[i] - query_lens[i] .. seq_lens[i] - 1`; its K/V for
positions `0 .. seq_lens[i] - 1` live in blocks `block_tables[i, :ceil(seq_lens[i] / block_size)]`.
Token t's new K/V is written to flat slot `slot_mapping[t] = block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [num_tokens] int64
    block_tables: torch.Tensor      # [num_reqs, max_num_blocks] int64, padded with 0
    query_start_loc: list[int]      # [num_reqs + 1]
    query_lens: list[int]           # [num_reqs]
    seq_lens: list[int]             # [num_reqs] context length including this step's tokens
    block_size: int
    # Optional per-request extra mask for the query rows (token trees): True = may attend.
    # Entry i is None or a bool tensor [query_lens[i], query_lens[i]] over this step's own tokens;
    # the earlier context is always visible.
    tree_masks: list[torch.Tensor | None] | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens) if self.query_lens else 0

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens) if self.seq_lens else 0

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1 and self.tree_masks is None


class DecodeTensors(NamedTuple):
    """A decode-only step's metadata as tensors only (one query row per request, no tree masks): what
    the compiled decode step (frugal.runner.compiled_decode) passes to attention instead of
    AttentionMetadata, whose Python lists Dynamo would guard on."""

    slot_mapping: torch.Tensor  # [num_reqs] int64
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks] int64, padded with 0
    seq_lens: torch.Tensor      # [num_reqs] int64, including this step's token
