"""Pure-Python fakes for exact scheduler traces: a toy model, a fake clock, and a fake runner that
keeps a simulated paged KV cache in both tiers (fast pool and slow swap tier).

The fake runner writes each scheduled token into the slot its block table names and, before
sampling, reads the whole context back from those slots: a wrong block table, a bad prefix-cache hit,
a stale speculative position or a wrong swap copy shows up as a wrong token or a failed assertion.
Swaps follow the runner contract of `SchedulerOutput`: swap-outs and swap-ins are copied before the
step's forward pass, prefetches land only before the NEXT step's (until then their blocks hold
garbage).
"""

from __future__ import annotations

from collections.abc import Callable

from frugal.config import SchedulerConfig
from frugal.core.policy import SchedulingPolicy
from frugal.core.scheduler import Scheduler
from frugal.core.scheduler_output import RunnerOutput, SchedulerOutput
from frugal.core.swap import SwapCostModel
from frugal.request import Request, RequestStatus
from frugal.sampling_params import SamplingParams

Model = Callable[[list[int]], int]


def toy_model(context: list[int]) -> int:
    """Deterministic next token of a context (never 0..2, which tests use as EOS/stop ids)."""
    return (sum(context[-3:]) * 31 + len(context)) % 97 + 3


def reference_tokens(prompt: list[int], num_tokens: int, model: Model = toy_model) -> list[int]:
    context = list(prompt)
    for _ in range(num_tokens):
        context.append(model(context))
    return context[len(prompt):]


class FakeClock:
    """A clock the test moves by hand (or the FakeRunner moves by fake step times)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.now += seconds


class FakeRunner:
    def __init__(self, scheduler: Scheduler, model: Model = toy_model, clock: FakeClock | None = None,
                 step_time: Callable[[SchedulerOutput], float] | float = 1.0):
        kv = scheduler.kv_cache_manager
        self.block_size = kv.block_size
        self.slots: list[list[int | None]] = [[None] * kv.block_size for _ in range(kv.num_blocks)]
        self.slow_slots: list[list[int | None]] = [[None] * kv.block_size for _ in range(scheduler.swap.pool.num_blocks)]
        self.pending_swap_ins: list[tuple[int, int]] = []
        self.model = model
        self.clock = clock
        self.step_time = step_time
        self.num_blocks_swapped = [0, 0]  # out, in

    def _read(self, block_ids: list[int], pos: int) -> int | None:
        return self.slots[block_ids[pos // self.block_size]][pos % self.block_size]

    def _apply_swaps(self, output: SchedulerOutput) -> None:
        for slow, fast in self.pending_swap_ins:  # the previous step's prefetches land now
            self.slots[fast] = list(self.slow_slots[slow])
        for fast, slow in output.swap_out_blocks:
            self.slow_slots[slow] = list(self.slots[fast])
        fast_destinations = [fast for _, fast in output.swap_in_blocks + output.prefetch_blocks]
        assert len(set(fast_destinations)) == len(fast_destinations), fast_destinations
        slow_sources = {slow for slow, _ in output.swap_in_blocks + output.prefetch_blocks}
        assert not slow_sources & {slow for _, slow in output.swap_out_blocks}, "slow block reused in one step"
        for slow, fast in output.swap_in_blocks:
            self.slots[fast] = list(self.slow_slots[slow])
        for _, fast in output.prefetch_blocks:  # in flight: garbage until the next step
            self.slots[fast] = [-1] * self.block_size
        self.pending_swap_ins = list(output.prefetch_blocks)
        self.num_blocks_swapped[0] += len(output.swap_out_blocks)
        self.num_blocks_swapped[1] += len(output.swap_in_blocks) + len(output.prefetch_blocks)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        self._apply_swaps(output)
        prefetched = set(output.prefetched_request_ids)
        result = RunnerOutput()
        for scheduled in output.scheduled:  # in order: a same-step cache hit comes from an earlier entry
            request, block_ids = scheduled.request, scheduled.block_ids
            assert request.request_id not in prefetched, "scheduled in the step that prefetches it"
            assert len(scheduled.token_ids) == scheduled.num_new_tokens
            for pos in range(scheduled.start_pos):
                assert self._read(block_ids, pos) == request.all_token_ids[pos], (request.request_id, pos)
            for offset, token_id in enumerate(scheduled.token_ids):
                pos = scheduled.start_pos + offset
                self.slots[block_ids[pos // self.block_size]][pos % self.block_size] = token_id
            if not scheduled.needs_sample:
                continue
            spec = scheduled.spec_token_ids
            num_known = scheduled.start_pos + scheduled.num_new_tokens - len(spec)
            assert num_known == request.num_tokens
            accepted = []
            for j in range(len(spec) + 1):  # verify: accept matching drafts, then one model token
                token_id = self.model([self._read(block_ids, pos) for pos in range(num_known + j)])
                accepted.append(token_id)
                if j == len(spec) or token_id != spec[j]:
                    break
            result.sampled_token_ids[request.request_id] = accepted
        if self.clock is not None:
            self.clock.advance(self.step_time(output) if callable(self.step_time) else self.step_time)
        return result


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 64, chunked: bool = True,
                   caching: bool = True, policy: SchedulingPolicy | None = None, num_swap_blocks: int = 0,
                   swap_cost_model: SwapCostModel | None = None, swap_lookahead: int | None = None,
                   clock: FakeClock | None = None) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, enable_chunked_prefill=chunked)
    extra = {"clock": clock} if clock is not None else {}
    return Scheduler(config, block_size, num_blocks, caching, policy, num_swap_blocks=num_swap_blocks,
                     swap_cost_model=swap_cost_model, swap_lookahead=swap_lookahead, **extra)


_arrival = [0.0]


def make_request(request_id: str, prompt: list[int] | range, max_model_len: int = 64, eos=(),
                 arrival_time: float | None = None, oracle_output_len: int | None = None, **params) -> Request:
    if arrival_time is None:
        _arrival[0] += 1.0
        arrival_time = _arrival[0]
    params.setdefault("max_tokens", 4)
    return Request(request_id, list(prompt), SamplingParams(**params), eos_token_ids=frozenset(eos),
                   max_model_len=max_model_len, arrival_time=arrival_time, oracle_output_len=oracle_output_len)


def check_invariants(scheduler: Scheduler, output: SchedulerOutput | None = None) -> None:
    """Lists partition the unfinished requests; fast-tier ref counts equal owners, sharing only of
    cached prefix blocks at the same position, free queue = the ref_cnt 0 blocks; every slow block is
    free, released, or owned by exactly one swapped request covering its computed tokens."""
    kv = scheduler.kv_cache_manager
    if output is not None:
        assert len(output.scheduled) <= scheduler.config.max_num_seqs
    lists = {"running": scheduler.running, "waiting": scheduler.waiting, "swapped": scheduler.swapped}
    ids = [r.request_id for requests in lists.values() for r in requests]
    assert sorted(ids) == sorted(scheduler.requests) and len(set(ids)) == len(ids)
    assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)
    assert all(r.status is RequestStatus.SWAPPED for r in scheduler.swapped)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in scheduler.waiting)
    owners: dict[int, list[tuple[str, int]]] = {}
    for request in scheduler.waiting:
        assert kv.get_block_ids(request.request_id) == [] and request.num_computed_tokens == 0
        assert scheduler.swap.slow_block_ids(request.request_id) == []
    for request in scheduler.running:
        assert scheduler.swap.slow_block_ids(request.request_id) == []
        for index, block in enumerate(kv.get_blocks(request.request_id)):
            owners.setdefault(block.block_id, []).append((request.request_id, index))
            if block.block_hash is not None:
                assert block.block_hash == kv.block_hashes(request)[index]
    for block in kv.block_pool.blocks:
        holders = owners.get(block.block_id, [])
        assert block.ref_cnt == len(holders), (block, holders)
        if len(holders) > 1:
            assert block.block_hash is not None and len({index for _, index in holders}) == 1, (block, holders)
    free = {block.block_id for block in kv.block_pool.free_block_queue}
    assert free == {block.block_id for block in kv.block_pool.blocks if block.ref_cnt == 0}
    # Slow tier.
    swap = scheduler.swap
    slow_owned = []
    for request in scheduler.swapped:
        assert kv.get_block_ids(request.request_id) == []
        table = swap.slow_block_ids(request.request_id)
        assert request.num_computed_tokens > 0
        assert len(table) == -(-request.num_computed_tokens // kv.block_size), (request.request_id, table)
        slow_owned.extend(table)
    assert sorted(swap.owners()) == sorted(r.request_id for r in scheduler.swapped)
    every_slow = slow_owned + swap.pool.free_block_ids() + swap.pool.released_block_ids()
    assert sorted(every_slow) == list(range(swap.pool.num_blocks)), "slow block leaked or double-owned"


def assert_all_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks and scheduler.num_used_blocks == 0
    assert all(block.ref_cnt == 0 for block in kv.block_pool.blocks)
    swap = scheduler.swap
    assert not swap.owners()
    assert swap.pool.num_free_blocks + swap.pool.num_released_blocks == swap.pool.num_blocks


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    output = scheduler.schedule()
    check_invariants(scheduler, output)
    assert output.num_scheduled_tokens == sum(s.num_new_tokens for s in output.scheduled)
    assert output.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
    return output, scheduler.update(output, runner.execute(output))


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 500) -> list[list[tuple]]:
    """Steps until done; returns per step [(request_id, start_pos, num_new_tokens, needs_sample)]."""
    trace = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        output, _ = step(scheduler, runner)
        trace.append([(s.request_id, s.start_pos, s.num_new_tokens, s.needs_sample) for s in output.scheduled])
    assert_all_free(scheduler)
    return trace
