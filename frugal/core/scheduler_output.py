"""The scheduler's decision for one step, handed to the model runner, and the runner's answer.

Plain data: lists and ints, never tensors (core/ does not import torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from frugal.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    The runner computes `token_ids` at positions `start_pos .. start_pos + num_new_tokens - 1`,
    writing their K/V into the slots given by `block_ids` (the request's whole block table after this
    step's allocation). When `needs_sample` is true the last position's logits are sampled (for
    speculative steps: the last `1 + len(spec_token_ids)` positions are verified). With
    `spec_parent_ids` the candidates are a token tree (spec/proposer.py): they still occupy the KV
    slots of the positions after the root in node order, but each is computed at position
    root + depth and sees only its ancestors.
    """

    request: Request
    start_pos: int
    num_new_tokens: int
    token_ids: list[int]            # [num_new_tokens]: known tokens, then spec tokens if any
    block_ids: list[int]
    spec_token_ids: list[int] = field(default_factory=list)
    needs_sample: bool = True
    # [len(spec_token_ids)] parent node of each candidate (0 = root); None = a chain.
    spec_parent_ids: list[int] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished (or were aborted) since the previous step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    # KV swapping (core/swap.py), in this order before the step's forward pass: land the previous
    # step's `prefetch_blocks`; copy `swap_out_blocks` (fast id, slow id) (their fast blocks may be
    # reused in this step); copy `swap_in_blocks` (slow id, fast id) (their requests may run in this
    # step). `prefetch_blocks` (slow id, fast id) belong to requests not scheduled in this step: that
    # copy may overlap this step's compute and must land before the next step's forward pass.
    swap_out_blocks: list[tuple[int, int]] = field(default_factory=list)
    swap_in_blocks: list[tuple[int, int]] = field(default_factory=list)
    prefetch_blocks: list[tuple[int, int]] = field(default_factory=list)
    swapped_out_request_ids: list[str] = field(default_factory=list)
    swapped_in_request_ids: list[str] = field(default_factory=list)   # swap_in_blocks' requests
    prefetched_request_ids: list[str] = field(default_factory=list)   # prefetch_blocks' requests
    # The scheduler's clock when this step was scheduled (the policy is charged from here to update()).
    scheduled_at: float = 0.0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """Per request that was sampled this step: the accepted tokens in order (one for plain decoding,
    one or more for speculative steps) and, when asked, their logprobs (same length)."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> per sampled token: (sampled token logprob, its rank, [(token_id, logprob), ...] top-k)
    logprobs: dict[str, list[tuple[float, int, list[tuple[int, float]]]]] = field(default_factory=dict)
