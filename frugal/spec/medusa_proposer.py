"""MedusaProposer: candidate trees from Medusa heads on the target's own hidden state.

After every target pass the engine hands over the final hidden state h at the position whose
logits produced the request's newest token (the tree's root); head d's top tokens on h are the
candidates at depth d, arranged in the fixed sparse tree of medusa_tree.py. The candidates are
deterministic (draft_probs None): the verifier treats them as one-hot, so greedy output equals plain
greedy and sampled output keeps the target's distribution, whatever the heads predict.

No KV cache of its own: the only per-request state is the last hidden state, dropped in `finish`.
"""

from __future__ import annotations

import logging

import torch

from frugal.request import Request
from frugal.spec.medusa import BaseLMHead, MedusaHeads
from frugal.spec.medusa_tree import MedusaTree, tree_tokens
from frugal.spec.proposer import Proposal, Proposer

logger = logging.getLogger(__name__)


class MedusaProposer(Proposer):
    name = "medusa"
    wants_hidden_states = True

    def __init__(self, heads: MedusaHeads, base_lm_head: BaseLMHead, tree: MedusaTree) -> None:
        if tree.depth > heads.num_heads:
            raise ValueError(f"tree depth {tree.depth} exceeds the {heads.num_heads} heads")
        self.heads = heads
        self.base_lm_head = base_lm_head
        self.tree = tree
        self._hidden: dict[str, torch.Tensor] = {}   # request id -> [H] hidden state at its root

    def observe_hidden_states(self, request_id: str, hidden: torch.Tensor) -> None:
        self._hidden[request_id] = hidden.detach().reshape(-1)

    @torch.no_grad()
    def head_top_tokens(self, hidden: torch.Tensor) -> list[list[list[int]]]:
        """hidden [B, H] -> per row b, per head d, the tree's `max_rank` best tokens: [B][K][R]."""
        logits = self.heads(hidden, self.base_lm_head)[: self.tree.depth]  # [K', B, V]
        top = logits.topk(self.tree.max_rank, dim=-1).indices  # [K', B, R]
        return top.permute(1, 0, 2).tolist()

    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        chosen = [r for r in requests if num_tokens.get(r.request_id, 0) > 0 and r.request_id in self._hidden]
        if not chosen:
            return {}
        hidden = torch.stack([self._hidden[r.request_id] for r in chosen])  # [B, H]
        top = self.head_top_tokens(hidden)
        proposals = {}
        for request, top_tokens in zip(chosen, top):
            n = min(num_tokens[request.request_id], self.tree.num_nodes)
            proposals[request.request_id] = Proposal(tree_tokens(self.tree, top_tokens, n),
                                                     parent_ids=list(self.tree.parent_ids[:n]))
        return proposals

    def finish(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._hidden.pop(request_id, None)
