"""Scheduler: iteration-level continuous batching over a paged KV cache (Orca + vLLM v1), with
policy-ranked preemption and KV swapping (FastServe).

There is no prefill phase and no decode phase. Each request has `num_computed_tokens` and a target
`num_tokens_with_spec` (prompt + output + speculative tokens); each step grants some requests new
tokens under a token budget so the first catches up with the second. Chunked prefill, prefix
caching, preemption and speculation are the same mechanism.

One step: the policy ranks every unfinished request (`running`: KV resident; `swapped`: KV in the
slow tier; `waiting`: no KV). Walking that ranking, at most `max_num_seqs` requests get tokens:
resident ones are granted tokens, waiting ones admitted, swapped ones near the top swapped back in
(at once when a seat is free, else as a prefetch whose copy overlaps this step's compute). Resident requests passed over
stay resident but paused. When blocks run out, the lowest-ranked resident request not yet served
(`policy.select_victim`) is evicted: swapped out when the slow tier has room and moving its KV is
cheaper than recomputing it (`core/swap.py`), else preempted by recompute. No request is admitted or
swapped in below one evicted in the same step. After the walk, with a slow tier, residents ranked
beyond the next `swap_lookahead` seats are swapped out proactively while fewer blocks are free than
the next step's likely needs. With FCFS ranking (running, swapped, waiting) and no slow tier this is
exactly vLLM v1's FCFS scheduler: running requests first, admission never preempts.
`schedule()` advances `num_computed_tokens` optimistically; `update()` appends the sampled tokens,
rolls back rejected speculative positions and applies the stop checks.

Always true:
- every request is in exactly one of `waiting`, `running`, `swapped`, or finished (and then owns no
  block in either tier); waiting ones own no block and have no computed token;
- at most `max_num_seqs` requests and `max_num_batched_tokens` tokens are scheduled per step;
- the best-ranked request always makes progress, and a running request's context never exceeds
  the pool (`num_tokens` is capped at the pool's capacity), so lack of KV memory never deadlocks;
- finished/aborted request ids reach the runner in the next `SchedulerOutput.finished_request_ids`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from frugal.config import SchedulerConfig
from frugal.core.batch_walk import BatchWalk
from frugal.core.kv_cache_manager import KVCacheManager
from frugal.core.policy import SchedulingPolicy, make_policy
from frugal.core.scheduler_output import RunnerOutput, ScheduledRequest, SchedulerOutput
from frugal.core.swap import SwapCostModel, SwapManager
from frugal.errors import InvalidRequestError
from frugal.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_size: int, num_blocks: int,
                 enable_prefix_caching: bool, policy: SchedulingPolicy | None = None, *,
                 num_swap_blocks: int = 0, swap_cost_model: SwapCostModel | None = None,
                 swap_lookahead: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = scheduler_config
        self.block_size = block_size
        self.policy = policy if policy is not None else make_policy(scheduler_config.policy)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.swap = SwapManager(num_swap_blocks, self.kv_cache_manager, swap_cost_model)
        # Ranks past the batch whose swapped requests are prefetched and whose residents are kept.
        self.swap_lookahead = scheduler_config.max_num_seqs if swap_lookahead is None else swap_lookahead
        assert self.swap_lookahead >= 0, self.swap_lookahead
        self.clock = clock
        self.requests: dict[str, Request] = {}      # unfinished requests by id
        self.waiting: list[Request] = []
        self.running: list[Request] = []            # KV resident: scheduled this step or paused
        self.swapped: list[Request] = []            # KV in the slow tier
        self.num_preemptions = 0                    # by recompute or by swap
        self.last_output: SchedulerOutput | None = None  # the latest schedule() (for step profiling)
        self._finished_request_ids: list[str] = []  # since the previous schedule()

    # ---- bookkeeping -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.kv_cache_manager.num_used_blocks

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def max_context_len(self, request: Request) -> int:
        """Tokens (prompt + output) the request may reach: its max_model_len, the configured one,
        and what the whole KV pool can hold."""
        return min(request.max_model_len, self.config.max_model_len, self.kv_cache_manager.capacity_tokens)

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises InvalidRequestError (a ValueError) for a duplicate id or a
        prompt that leaves no room for one output token."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already queued or running")
        if request.num_prompt_tokens == 0:
            raise InvalidRequestError(f"request {request.request_id!r} has an empty prompt")
        capacity = self.kv_cache_manager.capacity_tokens
        if request.num_prompt_tokens + 1 > capacity:
            raise InvalidRequestError(
                f"prompt of {request.num_prompt_tokens} tokens plus one output token does not fit in the KV "
                f"cache ({self.kv_cache_manager.num_blocks} blocks x {self.block_size} tokens = {capacity})")
        max_len = self.max_context_len(request)
        if request.num_prompt_tokens >= max_len:
            raise InvalidRequestError(
                f"prompt of {request.num_prompt_tokens} tokens leaves no room for output within "
                f"max_model_len {max_len}")
        assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0, request
        self.requests[request.request_id] = request
        self.policy.add_waiting(self.waiting, request)

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End waiting or running requests now (abort, or a stop string matched by the engine): their
        blocks are freed at once. Unknown or already finished ids are ignored."""
        assert status.is_finished, status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status is RequestStatus.SWAPPED:
                self.swapped.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, free its blocks in both tiers, forget it, and report it in the next output."""
        request.status = status
        request.finished_time = self.clock()
        request.clear_spec_tokens()
        self.kv_cache_manager.free(request)
        self.swap.free(request)
        del self.requests[request.request_id]
        self._finished_request_ids.append(request.request_id)
        self.policy.on_finished(request)

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: free the KV, forget the progress, back to `waiting`."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.clear_spec_tokens()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.add_preempted(self.waiting, request)
        logger.debug("preempted %s (%d tokens, %d free blocks)", request.request_id, request.num_tokens,
                     self.kv_cache_manager.num_free_blocks)

    def _swap_out(self, request: Request, output: SchedulerOutput) -> None:
        """Preempt by swapping: the KV moves to the slow tier, the progress is kept."""
        self.running.remove(request)
        request.clear_spec_tokens()  # drafts may not be computed past num_computed_tokens
        output.swap_out_blocks.extend(self.swap.swap_out(request))
        output.swapped_out_request_ids.append(request.request_id)
        request.status = RequestStatus.SWAPPED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.swapped.append(request)
        logger.debug("swapped out %s (%d computed tokens)", request.request_id, request.num_computed_tokens)

    def _evict(self, request: Request, output: SchedulerOutput) -> None:
        """Free a resident request's fast blocks the cheaper way: swap out or recompute later."""
        if self.swap.prefer_swap(request):
            self._swap_out(request, output)
        else:
            self._preempt(request)
            output.preempted_request_ids.append(request.request_id)

    # ---- schedule ----------------------------------------------------------------------------

    def _num_new_tokens(self, request: Request, token_budget: int) -> int:
        """Tokens to grant a running request: catch up with known + speculative tokens, within the
        budget, never computing a position whose sample would exceed the context limit."""
        # Spec token at position p yields the token at p + 1, useful only while p + 1 < max_len.
        max_spec = max(0, self.max_context_len(request) - 1 - request.num_tokens)
        target = request.num_tokens + min(len(request.spec_token_ids), max_spec)
        return max(0, min(target - request.num_computed_tokens, token_budget))

    def _make_scheduled(self, request: Request, num_new_tokens: int, block_ids: list[int]) -> ScheduledRequest:
        start_pos = request.num_computed_tokens
        end_pos = start_pos + num_new_tokens
        num_known = max(0, min(end_pos, request.num_tokens) - start_pos)
        spec_token_ids = request.spec_token_ids[:num_new_tokens - num_known]
        # A token tree cut to its first nodes is still a tree (parents precede their children).
        spec_parent_ids = (request.spec_parent_ids[:len(spec_token_ids)]
                           if request.spec_parent_ids is not None and spec_token_ids else None)
        token_ids = request.all_token_ids[start_pos:start_pos + num_known] + spec_token_ids
        return ScheduledRequest(request=request, start_pos=start_pos, num_new_tokens=num_new_tokens,
                                token_ids=token_ids, block_ids=block_ids, spec_token_ids=spec_token_ids,
                                needs_sample=end_pos >= request.num_tokens, spec_parent_ids=spec_parent_ids)

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self.swap.begin_step()
        finished_ids, self._finished_request_ids = self._finished_request_ids, []
        output = SchedulerOutput(scheduled=[], num_scheduled_tokens=0, finished_request_ids=finished_ids,
                                 scheduled_at=now)
        self.policy.order_running(self.running)
        self.policy.order_waiting(self.waiting)
        ranking = self.policy.rank(self.running, self.swapped, self.waiting, now)
        assert len(ranking) == len(self.requests), (len(ranking), len(self.requests))
        walk = BatchWalk(self, ranking, output)
        walk.run()
        if self.swap.enabled:
            walk.swap_out_proactively()

        # Advance optimistically (vLLM v1): update() rolls back rejected speculative positions.
        for scheduled_request in output.scheduled:
            scheduled_request.request.num_computed_tokens += scheduled_request.num_new_tokens
            self.policy.on_scheduled(scheduled_request.request, scheduled_request.num_new_tokens)
        output.num_scheduled_tokens = self.config.max_num_batched_tokens - walk.token_budget
        self.last_output = output
        return output

    # ---- update ------------------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        """Apply one step's sampled tokens. Returns the requests that received tokens or finished."""
        now = self.clock()
        self.policy.on_step_done([s.request for s in scheduler_output.scheduled],
                                 max(0.0, now - scheduler_output.scheduled_at), now)
        updated: list[Request] = []
        for scheduled_request in scheduler_output.scheduled:
            request = scheduled_request.request
            if request.status is not RequestStatus.RUNNING or self.requests.get(request.request_id) is not request:
                continue  # finished or aborted since schedule()
            if not scheduled_request.needs_sample:
                continue  # a prefill chunk: nothing to sample yet
            sampled_token_ids = runner_output.sampled_token_ids.get(request.request_id)
            num_spec = len(scheduled_request.spec_token_ids)
            if not sampled_token_ids:
                # The runner did not sample it: recompute the last known position next step.
                logger.warning("no token sampled for %s; recomputing its last position", request.request_id)
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                request.clear_spec_tokens()
                continue
            assert len(sampled_token_ids) <= num_spec + 1, \
                f"{request.request_id}: {len(sampled_token_ids)} tokens accepted from {num_spec} speculative"
            # Rejected speculative positions hold wrong K/V: compute them again. For a token tree the
            # runner has moved the accepted path's K/V to the first positions after the root.
            request.num_computed_tokens -= num_spec + 1 - len(sampled_token_ids)
            request.clear_spec_tokens()
            for token_id in sampled_token_ids:
                request.append_output_token_ids([token_id])
                if request.first_token_time is None:
                    request.first_token_time = now
                status = self._check_stop(request, token_id)
                if status is not None:
                    self.running.remove(request)
                    self._finish(request, status)
                    break  # later tokens are dropped
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """The finished status the request reaches with `token_id` just appended, or None."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_output_tokens
                or request.num_tokens >= self.max_context_len(request)):
            return RequestStatus.FINISHED_LENGTH
        return None

