"""The Proposer seam: whatever makes speculative candidates (prompt lookup, a draft model, ...).

Once per engine step, after the scheduler has applied the step's accepted tokens, the engine asks
the proposer for up to `num_tokens[request_id]` candidate tokens per running request. The verifier
(verify.py) checks them in the next target pass. A proposer keeps whatever per-request state it
needs (a draft KV cache) and drops it in `finish`.

Candidates form a chain or a token tree. A tree is given by `Proposal.parent_ids`: node 0 is the
root (the request's last known token), node i (1..n) holds `token_ids[i-1]` and its parent is
`parent_ids[i-1]` with `0 <= parent_ids[i-1] < i` (topological order), so any prefix of the nodes is
again a tree (the scheduler may cut a proposal to its token budget). The engine verifies the whole
tree in one target pass (SpecInfer, Miao et al. 2024): node i sits at position root + depth(i) and
attends only to the context, its ancestors and itself.

A proposer that sets `wants_hidden_states` is handed, after every target pass that produced tokens
for a request and before the next `propose`, the target's final hidden state (after the last norm,
the LM head's input) at the position whose logits produced the request's newest token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from frugal.request import Request


@dataclass
class Proposal:
    token_ids: list[int]                      # [n] the candidate nodes 1..n, n >= 1
    # [n, V]: row i = the distribution node i + 1's token was drawn from; None = deterministic candidates.
    draft_probs: torch.Tensor | None = None
    # [n]: parent of node i + 1 (0 = the root, the last known token), each < i + 1; None = a chain.
    parent_ids: list[int] | None = None


class Proposer(ABC):
    """Makes candidate chains (or trees) for a batch of requests."""

    name: str = "proposer"
    # True: the engine calls `observe_hidden_states` after every target pass (see the module docstring).
    wants_hidden_states: bool = False

    @abstractmethod
    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        """Candidates for each request in `requests` (at most num_tokens[id] each, id absent from the
        result = no candidates). `request.all_token_ids` are the verified tokens so far."""

    def observe_hidden_states(self, request_id: str, hidden: torch.Tensor) -> None:
        """hidden [hidden_size]: the target's final hidden state at the position that produced the
        request's newest token (only called when `wants_hidden_states`)."""

    def finish(self, request_ids: list[str]) -> None:
        """Drop the state of requests that finished or were preempted."""
