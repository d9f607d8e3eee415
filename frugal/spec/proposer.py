"""The Proposer seam: whatever makes speculative candidates (prompt lookup, a draft model, ...).

Once per engine step, after the scheduler has applied the step's accepted tokens, the engine asks
the proposer for up to `num_tokens[request_id]` candidate tokens per running request. The verifier
(verify.py) checks them in the next target pass. A proposer keeps whatever per-request state it
needs (a draft KV cache) and drops it in `finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from frugal.request import Request


@dataclass
class Proposal:
    token_ids: list[int]                      # [k] the candidate chain, k >= 1
    # [k, V]: row i = the distribution token i was drawn from; None = deterministic candidates.
    draft_probs: torch.Tensor | None = None


class Proposer(ABC):
    """Makes candidate chains for a batch of requests."""

    name: str = "proposer"

    @abstractmethod
    def propose(self, requests: list[Request], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        """Candidates for each request in `requests` (at most num_tokens[id] each, id absent from the
        result = no candidates). `request.all_token_ids` are the verified tokens so far."""

    def finish(self, request_ids: list[str]) -> None:
        """Drop the state of requests that finished or were preempted."""
