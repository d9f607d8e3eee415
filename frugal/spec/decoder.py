"""SpecDecoder: plugs a Proposer, the verifier and the adaptive length policy into the engine.

Hooks, all set at construction: the engine calls `after_step` at the end of every step (drop
finished requests, then propose candidates into `request.spec_token_ids`, and their tree into
`request.spec_parent_ids`, for the next step), and the ModelRunner calls `verify` for each request
whose step carries candidates (it returns the accepted tokens and tree nodes; the runner moves the
accepted nodes' K/V onto the positions after the root) and, when the proposer wants them,
`hidden_state_observer` with the target's final hidden state of each request's newest token. The
scheduler counts the candidates in the step's token budget and rolls back the rejected positions
from the accepted list the runner returns, so the target KV never holds a rejected token past the
next step.

Stats are by chain position, for trees by depth: a step counts as proposing depth d when its tree
has a node at depth d, and as accepting it when the accepted path reaches depth d.

Only requests in steady decoding get candidates: all known tokens but the last computed, sampling
expressible as per-position distributions (`verify.speculation_supported`), min_tokens reached, and
room for at least one candidate plus the target's token under max_tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from frugal.core.scheduler_output import SchedulerOutput
from frugal.request import Request, RequestStatus
from frugal.spec.adaptive import AdaptiveLength
from frugal.spec.proposer import Proposal, Proposer
from frugal.spec.verify import VerifyResult, chain_parents, sampling_probs, speculation_supported, verify_tree

logger = logging.getLogger(__name__)


@dataclass
class SpecStats:
    """One request's speculation so far."""

    num_target_steps: int = 0        # target passes that produced tokens for it (with or without candidates)
    num_generated_tokens: int = 0    # tokens those passes produced
    num_verify_steps: int = 0        # passes that verified at least one candidate
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    # [k_max] steps that proposed chain position (tree depth) i + 1, and how many of them accepted it
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    @property
    def tokens_per_target_step(self) -> float:
        """Mean tokens produced per target pass (1.0 = no gain)."""
        return self.num_generated_tokens / self.num_target_steps if self.num_target_steps else 0.0

    @property
    def accepted_per_verify_step(self) -> float:
        """Mean accepted candidates per pass that verified some."""
        return self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    def as_dict(self) -> dict:
        return {"num_target_steps": self.num_target_steps, "num_generated_tokens": self.num_generated_tokens,
                "num_verify_steps": self.num_verify_steps, "num_proposed_tokens": self.num_proposed_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "tokens_per_target_step": self.tokens_per_target_step,
                "acceptance_by_position": self.acceptance_by_position}


class SpecDecoder:
    def __init__(self, proposer: Proposer, k_max: int, *, adaptive: bool = True, verify_cost: float = 0.1,
                 draft_cost: float = 0.0):
        self.proposer = proposer
        self.k_max = k_max
        self.policy = AdaptiveLength(k_max, verify_cost, draft_cost, enabled=adaptive)
        self._draft_probs: dict[str, torch.Tensor | None] = {}
        self._stats: dict[str, SpecStats] = {}
        # The runner's hidden-state hook: set only when the proposer reads them (no cost otherwise).
        self.hidden_state_observer: Callable[[str, torch.Tensor], None] | None = (
            proposer.observe_hidden_states if proposer.wants_hidden_states else None)

    def stats_of(self, request_id: str) -> SpecStats | None:
        """A copy of the request's stats so far (None before its first sampled token)."""
        stats = self._stats.get(request_id)
        if stats is None:
            return None
        return replace(stats, proposed_by_position=list(stats.proposed_by_position),
                       accepted_by_position=list(stats.accepted_by_position))

    # ---- engine hook ----------------------------------------------------------------------------

    def after_step(self, scheduler_output: SchedulerOutput, running: list[Request]) -> None:
        """Count the step's plain decode passes, forget requests finished before this step (their
        final stats were reported by then), and propose the next step's candidates. Called after
        the scheduler's update and before the step's outputs are built."""
        for scheduled in scheduler_output.scheduled:
            if scheduled.needs_sample and not scheduled.spec_token_ids:
                self._record(scheduled.request_id, 0, 0, 1)
        # Draft state goes as soon as a request finishes; stats once its final output was built.
        finished_now = [s.request_id for s in scheduler_output.scheduled if s.request.is_finished]
        done = list(scheduler_output.finished_request_ids)
        if finished_now or done:
            self.proposer.finish(finished_now + done)
            for request_id in done:
                self._draft_probs.pop(request_id, None)
                self._stats.pop(request_id, None)
                self.policy.forget(request_id)
        lengths = {}
        for request in running:
            k = self._max_candidates(request)
            if k > 0:
                k = min(k, self.policy.next_length(request.request_id))
            if k > 0:
                lengths[request.request_id] = k
        if not lengths:
            return
        candidates = [r for r in running if r.request_id in lengths]
        proposals = self.proposer.propose(candidates, lengths)
        for request in candidates:
            proposal: Proposal | None = proposals.get(request.request_id)
            if proposal is None or not proposal.token_ids:
                continue
            tokens = proposal.token_ids[: lengths[request.request_id]]
            parents = None
            if proposal.parent_ids is not None:
                parents = _checked_parents(proposal, len(tokens), request.request_id)
            request.spec_token_ids = list(tokens)
            request.spec_parent_ids = parents
            probs = proposal.draft_probs
            self._draft_probs[request.request_id] = None if probs is None else probs[: len(tokens)]

    def _max_candidates(self, request: Request) -> int:
        params = request.sampling_params
        if (request.status is not RequestStatus.RUNNING or request.num_computed_tokens < request.num_tokens - 1
                or not speculation_supported(params) or request.num_output_tokens < params.min_tokens):
            return 0
        room = request.max_output_tokens - request.num_output_tokens - 1  # the target adds one token
        return max(0, min(self.k_max, room))

    # ---- runner hook ----------------------------------------------------------------------------

    def verify(self, request: Request, spec_token_ids: list[int], logits: torch.Tensor,
               generator: torch.Generator | None, parent_ids: list[int] | None = None) -> VerifyResult:
        """logits [1 + len(spec_token_ids), V] at the last known position and each candidate node
        (`parent_ids`: their tree as scheduled, None = a chain) -> the accepted candidates plus one
        target token, and the accepted nodes (1..n, root to leaf)."""
        params = request.sampling_params
        num_spec = len(spec_token_ids)
        parents = chain_parents(num_spec) if parent_ids is None else parent_ids
        draft_probs = self._draft_probs.pop(request.request_id, None)
        if params.is_greedy:
            result = verify_tree(logits, spec_token_ids, parents, greedy=True)
        else:
            if draft_probs is not None and draft_probs.shape[0] != num_spec:
                draft_probs = draft_probs[:num_spec]  # the scheduler trimmed the candidates
            result = verify_tree(sampling_probs(logits, params), spec_token_ids, parents,
                                 greedy=False, draft_probs=draft_probs, generator=generator)
        depths = [0]
        for parent in parents:
            depths.append(depths[parent] + 1)
        self._record(request.request_id, num_spec, result.num_accepted, len(result.token_ids),
                     max_depth=max(depths))
        return result

    def _record(self, request_id: str, num_proposed: int, num_accepted: int, num_generated: int,
                max_depth: int | None = None) -> None:
        """One target pass; `max_depth` = the deepest candidate (a chain's is num_proposed)."""
        stats = self._stats.setdefault(request_id, SpecStats())
        stats.num_target_steps += 1
        stats.num_generated_tokens += num_generated
        if num_proposed == 0:
            return
        depth = num_proposed if max_depth is None else max_depth
        stats.num_verify_steps += 1
        stats.num_proposed_tokens += num_proposed
        stats.num_accepted_tokens += num_accepted
        while len(stats.proposed_by_position) < depth:
            stats.proposed_by_position.append(0)
            stats.accepted_by_position.append(0)
        for position in range(depth):
            stats.proposed_by_position[position] += 1
            if position < num_accepted:
                stats.accepted_by_position[position] += 1
        # The policy models a chain: a tree counts as a chain as deep as it.
        self.policy.observe(request_id, depth, num_accepted)


def _checked_parents(proposal: Proposal, num_tokens: int, request_id: str) -> list[int]:
    """The proposal's parent ids cut to `num_tokens`, checked to form a tree rooted at node 0."""
    parents = list(proposal.parent_ids[:num_tokens])
    if len(proposal.parent_ids) != len(proposal.token_ids):
        raise ValueError(f"{request_id}: proposal has {len(proposal.token_ids)} tokens and "
                         f"{len(proposal.parent_ids)} parent ids")
    for index, parent in enumerate(parents, start=1):
        if not 0 <= parent < index:
            raise ValueError(f"{request_id}: node {index} has parent {parent}; parents must precede their children")
    return parents
