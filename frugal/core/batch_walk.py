"""BatchWalk: one step's pass over the policy's ranking, deciding who runs, who is admitted, who is
swapped in or out and who is evicted (the algorithm is described in `core/scheduler.py`).

Always true: the walk only fills its `SchedulerOutput` and moves requests between the Scheduler's
lists through the Scheduler's own methods; a request swapped in during the walk is never evicted in
the same step, and no request ranked below one evicted in this step is brought in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from frugal.core.scheduler_output import SchedulerOutput
from frugal.request import Request, RequestStatus

if TYPE_CHECKING:
    from frugal.core.scheduler import Scheduler


class BatchWalk:
    """One step's pass over the policy's ranking (see the module docstring); fills `output`."""

    def __init__(self, scheduler: Scheduler, ranking: list[Request], output: SchedulerOutput):
        self.scheduler = scheduler
        self.kv = scheduler.kv_cache_manager
        self.ranking = ranking
        self.output = output
        self.token_budget = scheduler.config.max_num_batched_tokens
        self.num_seats = scheduler.config.max_num_seqs
        self.swap_window = self.num_seats + scheduler.swap_lookahead
        self.scheduled_ids: set[str] = set()
        self.moved_ids: set[str] = set()   # swapped in during this step: never evicted in it
        # No waiting or swapped request at or below this rank is brought in during this step.
        self.min_victim_rank = len(ranking)
        # A request could not be brought in (no memory, or no chunking): none ranked below it is.
        self.admission_blocked = False

    @property
    def has_seat(self) -> bool:
        return len(self.output.scheduled) < self.num_seats and self.token_budget > 0

    def run(self) -> None:
        for index, request in enumerate(self.ranking):
            if not self.has_seat and index >= self.swap_window:
                break  # nothing below can be served, admitted or prefetched
            status = request.status
            if status is RequestStatus.RUNNING:
                self._serve_resident(index, request)
            elif index >= self.min_victim_rank or self.admission_blocked:
                continue
            elif status is RequestStatus.SWAPPED:
                if index < self.swap_window:
                    self._swap_in(index, request)
            elif self.has_seat:
                self._admit(index, request)

    def _serve_resident(self, index: int, request: Request) -> None:
        if not self.has_seat:
            return  # paused: stays resident
        num_new_tokens = self.scheduler._num_new_tokens(request, self.token_budget)
        if num_new_tokens == 0:
            return
        block_ids = self._allocate(index, request, lambda: self.kv.allocate_slots(request, num_new_tokens),
                                   num_blocks_needed=None)
        if block_ids is not None:
            self._schedule(request, num_new_tokens, block_ids)

    def _admit(self, index: int, request: Request) -> None:
        scheduler = self.scheduler
        computed_blocks, num_cached_tokens = self.kv.get_computed_blocks(request)
        num_new_tokens = request.num_tokens - num_cached_tokens
        if not scheduler.config.enable_chunked_prefill and num_new_tokens > self.token_budget:
            self.admission_blocked = True
            return
        num_new_tokens = min(num_new_tokens, self.token_budget)
        num_blocks_needed = -(-(num_cached_tokens + num_new_tokens) // self.block_size) - len(computed_blocks)
        block_ids = self._allocate(index, request,
                                   lambda: self.kv.allocate_slots(request, num_new_tokens, computed_blocks),
                                   num_blocks_needed=num_blocks_needed)
        if block_ids is None:
            self.admission_blocked = True
            return
        scheduler.waiting.remove(request)
        request.num_computed_tokens = num_cached_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self.output.scheduled_at
        request.status = RequestStatus.RUNNING
        scheduler.running.append(request)
        self._schedule(request, num_new_tokens, block_ids)

    def _swap_in(self, index: int, request: Request) -> None:
        """Bring a swapped request's KV back. With a seat free it may evict lower-ranked residents,
        and it is served in this step (the copy lands before the forward pass); without one it is
        prefetched into free blocks only, the copy overlapping this step, and runs from the next."""
        swap = self.scheduler.swap
        urgent = self.has_seat
        pairs = self._allocate(index, request, lambda: swap.swap_in(request),
                               num_blocks_needed=swap.num_blocks_to_swap_in(request) if urgent else 0)
        if pairs is None:
            self.admission_blocked = True
            return
        self.scheduler.swapped.remove(request)
        request.status = RequestStatus.RUNNING
        self.scheduler.running.append(request)
        self.moved_ids.add(request.request_id)
        if urgent:
            self.output.swap_in_blocks.extend(pairs)
            self.output.swapped_in_request_ids.append(request.request_id)
            self._serve_resident(index, request)
        else:
            self.output.prefetch_blocks.extend(pairs)
            self.output.prefetched_request_ids.append(request.request_id)

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def _schedule(self, request: Request, num_new_tokens: int, block_ids: list[int]) -> None:
        self.output.scheduled.append(self.scheduler._make_scheduled(request, num_new_tokens, block_ids))
        self.scheduled_ids.add(request.request_id)
        self.token_budget -= num_new_tokens

    def _evictable_below(self, index: int) -> list[Request]:
        """Resident requests ranked below `index`, neither served nor swapped in during this step."""
        return [r for r in self.ranking[index + 1:] if r.status is RequestStatus.RUNNING
                and r.request_id not in self.scheduled_ids and r.request_id not in self.moved_ids]

    def _allocate(self, index: int, request: Request, allocate, num_blocks_needed: int | None):
        """`allocate()`, evicting lower-ranked residents (the policy's victims) until it succeeds.

        A resident (`num_blocks_needed` None) may give way itself, as in vLLM, and may evict by
        recompute. A request being brought in states the blocks it needs: 0 forbids evicting; it only
        evicts residents that leave cheaply (swapped with room, or recomputed where that is cheaper:
        never recomputed only because the slow tier is full, which would thrash), and only if their
        blocks would cover the need. Returns allocate()'s result, or None."""
        result = allocate()
        if result is not None or num_blocks_needed == 0:
            return result
        resident = num_blocks_needed is None
        candidates = self._evictable_below(index)
        if resident:
            if request.request_id not in self.moved_ids:  # one swapped in now cannot leave now
                candidates.insert(0, request)
        else:
            candidates = [victim for victim in candidates if self.scheduler.swap.evicts_cheaply(victim)]
            reclaimable = sum(1 for victim in candidates for block in self.kv.get_blocks(victim.request_id)
                              if block.ref_cnt == 1)
            if self.kv.num_free_blocks + reclaimable < num_blocks_needed:
                return None
        while result is None and candidates:
            victim = self.scheduler.policy.select_victim(candidates)
            candidates.remove(victim)
            if not resident and not self.scheduler.swap.evicts_cheaply(victim):
                continue  # the slow tier filled up meanwhile
            self.scheduler._evict(victim, self.output)
            self.min_victim_rank = min(self.min_victim_rank, self.ranking.index(victim))
            if victim is request:
                return None
            result = allocate()
        return result

    def swap_out_proactively(self) -> None:
        """FastServe's proactive swapping: while fewer blocks are free than the best-ranked requests
        will want next step (growth of the scheduled ones, plus the waiting and swapped ones within
        the look-ahead window), swap out the residents least likely to run soon (ranked beyond the
        window), lowest first, where swapping beats recomputing them."""
        scheduler, kv, block_size = self.scheduler, self.kv, self.block_size
        num_blocks_needed = sum(1 for s in self.output.scheduled
                                if s.start_pos + s.num_new_tokens >= len(s.block_ids) * block_size)
        for request in self.ranking[:self.swap_window]:
            if request.status is RequestStatus.SWAPPED:
                num_blocks_needed += scheduler.swap.num_blocks_to_swap_in(request)
            elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                num_blocks_needed += -(-request.num_tokens // block_size)
        num_blocks_needed = min(num_blocks_needed, kv.num_blocks)
        if kv.num_free_blocks >= num_blocks_needed:
            return
        candidates = self._evictable_below(self.swap_window - 1)
        while candidates and kv.num_free_blocks < num_blocks_needed:
            victim = scheduler.policy.select_victim(candidates)
            candidates.remove(victim)
            if scheduler.swap.prefer_swap(victim):
                scheduler._swap_out(victim, self.output)
