"""Token embedding and LM head.

`VocabEmbedding` stores its table through an `EmbeddingMethod` (default: a dense `weight [vocab_size,
hidden]`; INT8 rows with per-token scales when quantized) and looks rows up with `embed`. `LMHead`
projects hidden states to vocabulary logits through a `LinearMethod` (default: dense `weight`) —
either its own tensors or, when tied, the embedding's: the same Parameter objects, so tying survives
materialisation and costs no memory (tied embedding and head must use matching methods). Logits are
float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from frugal.layers.linear import LinearMethod, UnquantizedLinearMethod, copy_checked


class EmbeddingMethod(ABC):
    """How an embedding table is stored (`create_weights`) and read (`embed`)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, vocab_size: int, hidden_size: int, params_dtype: torch.dtype) -> None:
        """Register the table's parameter(s) on `layer`, each with `weight_loader = layer.weight_loader`."""

    @abstractmethod
    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [num_tokens] -> [num_tokens, hidden] in the model dtype."""


class UnquantizedEmbeddingMethod(EmbeddingMethod):
    def create_weights(self, layer: nn.Module, vocab_size: int, hidden_size: int, params_dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=params_dtype),
                              requires_grad=False)  # [vocab_size, hidden]
        weight.weight_loader = layer.weight_loader
        layer.register_parameter("weight", weight)

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, layer.weight)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype | None = None,
                 embedding_method: EmbeddingMethod | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding_method = embedding_method or UnquantizedEmbeddingMethod()
        self.embedding_method.create_weights(self, vocab_size, hidden_size,
                                             params_dtype or torch.get_default_dtype())

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id is None
        copy_checked(param, loaded, "embedding weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_method.embed(self, input_ids)  # [num_tokens, hidden]


class LMHead(nn.Module):
    """hidden [n, hidden] -> logits [n, vocab_size] float32."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.input_size, self.output_size = hidden_size, vocab_size
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, hidden_size, [vocab_size], params_dtype or torch.get_default_dtype())

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the embedding's parameters (tie_word_embeddings); the two methods store the same tensors."""
        own = {name for name, _ in self.named_parameters(recurse=False)}
        shared = dict(embedding.named_parameters(recurse=False))
        assert own == set(shared), f"cannot tie an LM head with {sorted(own)} to an embedding with {sorted(shared)}"
        for name, param in shared.items():
            setattr(self, name, param)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id is None
        copy_checked(param, loaded, "lm_head weight")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, hidden_states, None).float()
