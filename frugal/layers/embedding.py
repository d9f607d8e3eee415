"""Token embedding and LM head.

`VocabEmbedding.weight [vocab_size, hidden]`. `LMHead` projects hidden states to vocabulary logits,
either with its own `weight [vocab_size, hidden]` or, when tied, with the embedding's weight — the
same Parameter object, so tying survives materialisation and costs no memory. Logits are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frugal.layers.linear import copy_checked


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False)  # [vocab_size, hidden]
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id is None
        copy_checked(param, loaded, "embedding weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]


class LMHead(nn.Module):
    """hidden [n, hidden] -> logits [n, vocab_size] float32."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=params_dtype or torch.get_default_dtype()),
            requires_grad=False)  # [vocab_size, hidden]
        self.weight.weight_loader = self.weight_loader

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings)."""
        self.weight = embedding.weight

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id is None
        copy_checked(param, loaded, "lm_head weight")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight).float()
