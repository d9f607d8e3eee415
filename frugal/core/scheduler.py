"""Scheduler: iteration-level continuous batching over a paged KV cache (Orca + vLLM v1).

There is no prefill phase and no decode phase. Each request has `num_computed_tokens` and a target
`num_tokens_with_spec` (prompt + output + speculative tokens); each step grants every request some
new tokens under a token budget so the first catches up with the second. Chunked prefill, prefix
caching, preemption and speculation are the same mechanism.

One step: running requests (in policy order) get tokens first; when blocks run out the policy's
victim is preempted by recompute (KV freed, back to `waiting`). If nobody was preempted, waiting
requests are admitted in policy order while budget, seats and blocks last (admission never preempts).
`schedule()` advances `num_computed_tokens` optimistically; `update()` appends the sampled tokens,
rolls back rejected speculative positions and applies the stop checks.

Always true:
- every request is in exactly one of `waiting`, `running`, or finished (and then owns no block);
- at most `max_num_seqs` running; at most `max_num_batched_tokens` tokens per step;
- the earliest FCFS arrival always makes progress, and a running request's context never exceeds
  the pool (`num_tokens` is capped at the pool's capacity), so lack of KV memory never deadlocks;
- finished/aborted request ids reach the runner in the next `SchedulerOutput.finished_request_ids`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from frugal.config import SchedulerConfig
from frugal.core.kv_cache_manager import KVCacheManager
from frugal.core.policy import SchedulingPolicy, make_policy
from frugal.core.scheduler_output import RunnerOutput, ScheduledRequest, SchedulerOutput
from frugal.errors import InvalidRequestError
from frugal.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_size: int, num_blocks: int,
                 enable_prefix_caching: bool, policy: SchedulingPolicy | None = None):
        self.config = scheduler_config
        self.block_size = block_size
        self.policy = policy if policy is not None else make_policy(scheduler_config.policy)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}      # unfinished requests by id
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
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

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

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
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, free its blocks, forget it, and report it in the next output."""
        request.status = status
        request.finished_time = time.monotonic()
        request.spec_token_ids.clear()
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_request_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: free the KV, forget the progress, back to `waiting`."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids.clear()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.policy.add_preempted(self.waiting, request)
        logger.debug("preempted %s (%d tokens, %d free blocks)", request.request_id, request.num_tokens,
                     self.kv_cache_manager.num_free_blocks)

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
        token_ids = request.all_token_ids[start_pos:start_pos + num_known] + spec_token_ids
        return ScheduledRequest(request=request, start_pos=start_pos, num_new_tokens=num_new_tokens,
                                token_ids=token_ids, block_ids=block_ids, spec_token_ids=spec_token_ids,
                                needs_sample=end_pos >= request.num_tokens)

    def schedule(self) -> SchedulerOutput:
        token_budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        scheduled_ids: set[str] = set()
        preempted_ids: list[str] = []
        kv = self.kv_cache_manager

        # 1. Running requests, in policy order; preempt (recompute) when blocks run out.
        self.policy.order_running(self.running)
        for request in list(self.running):
            if token_budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new_tokens = self._num_new_tokens(request, token_budget)
            if num_new_tokens == 0:
                continue
            block_ids = kv.allocate_slots(request, num_new_tokens)
            while block_ids is None:
                candidates = [r for r in self.running if r.request_id not in scheduled_ids]
                victim = self.policy.select_victim(candidates)
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
                block_ids = kv.allocate_slots(request, num_new_tokens)
            if block_ids is None:
                continue  # the request itself gave way
            scheduled.append(self._make_scheduled(request, num_new_tokens, block_ids))
            scheduled_ids.add(request.request_id)
            token_budget -= num_new_tokens

        # 2. Admit waiting requests while budget, seats and blocks last; never preempt to admit.
        if not preempted_ids:
            self.policy.order_waiting(self.waiting)
            while self.waiting and token_budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                computed_blocks, num_cached_tokens = kv.get_computed_blocks(request)
                num_new_tokens = request.num_tokens - num_cached_tokens
                if not self.config.enable_chunked_prefill and num_new_tokens > token_budget:
                    break
                num_new_tokens = min(num_new_tokens, token_budget)
                block_ids = kv.allocate_slots(request, num_new_tokens, computed_blocks)
                if block_ids is None:
                    break
                self.waiting.pop(0)
                request.num_computed_tokens = num_cached_tokens
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_cached_tokens
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = time.monotonic()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                scheduled.append(self._make_scheduled(request, num_new_tokens, block_ids))
                scheduled_ids.add(request.request_id)
                token_budget -= num_new_tokens

        # 3. Advance optimistically (vLLM v1): update() rolls back rejected speculative positions.
        for scheduled_request in scheduled:
            scheduled_request.request.num_computed_tokens += scheduled_request.num_new_tokens
            self.policy.on_scheduled(scheduled_request.request, scheduled_request.num_new_tokens)

        finished_ids, self._finished_request_ids = self._finished_request_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self.config.max_num_batched_tokens - token_budget,
            preempted_request_ids=preempted_ids,
            finished_request_ids=finished_ids,
        )

    # ---- update ------------------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Request]:
        """Apply one step's sampled tokens. Returns the requests that received tokens or finished."""
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
                request.spec_token_ids.clear()
                continue
            assert len(sampled_token_ids) <= num_spec + 1, \
                f"{request.request_id}: {len(sampled_token_ids)} tokens accepted from {num_spec} speculative"
            # Rejected speculative positions hold wrong K/V: compute them again.
            request.num_computed_tokens -= num_spec + 1 - len(sampled_token_ids)
            request.spec_token_ids.clear()
            for token_id in sampled_token_ids:
                request.append_output_token_ids([token_id])
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
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
