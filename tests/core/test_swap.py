"""KV swapping: slow-tier bookkeeping, the swap-vs-recompute decision, and exact scheduler traces of
swap-outs, swap-ins, prefetches and proactive swap-outs (fake clock, fake step times). The fake
runner moves simulated KV between the tiers, so a wrong copy shows up as a wrong token."""

from __future__ import annotations

import pytest

from scheduling_fakes import (FakeClock, FakeRunner, assert_all_free, check_invariants, make_request,
                              make_scheduler, reference_tokens, step)
from frugal.core.kv_cache_manager import KVCacheManager
from frugal.core.mlfq import MLFQPolicy
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.swap import SlowBlockPool, SwapCostModel, SwapManager
from frugal.request import RequestStatus


def mlfq() -> MLFQPolicy:
    return MLFQPolicy(quantum_s=1.0, num_levels=3, starvation_s=float("inf"))


def trace_row(output) -> tuple:
    return ([(s.request_id, s.start_pos, s.num_new_tokens, s.block_ids) for s in output.scheduled],
            output.swap_out_blocks, output.swap_in_blocks, output.prefetch_blocks)


def test_slow_block_pool_hands_out_lowest_first_and_reuses_released_blocks_one_step_later():
    pool = SlowBlockPool(4)
    assert pool.allocate(3) == [0, 1, 2] and pool.allocate(2) is None
    pool.release([1, 0])
    assert pool.num_free_blocks == 1 and pool.allocate(2) is None  # released, not free yet
    pool.flush_released()
    assert pool.allocate(3) == [3, 1, 0] and pool.num_free_blocks == 0


def test_swap_manager_moves_only_computed_blocks_and_skips_copies_of_prefix_hits():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    swap = SwapManager(5, kv)
    request = make_request("r", range(3, 13), max_tokens=4)  # 10 prompt tokens
    assert kv.allocate_slots(request, 10) == [0, 1, 2]
    request.num_computed_tokens = 10
    kv.allocate_slots(request, 3)  # a table covering speculative positions beyond the computed ones
    assert kv.get_block_ids("r") == [0, 1, 2, 3]
    assert swap.num_blocks_to_swap_out(request) == 3 and swap.prefer_swap(request)
    assert swap.swap_out(request) == [(0, 0), (1, 1), (2, 2)]
    assert kv.get_block_ids("r") == [] and kv.num_free_blocks == 6 and swap.slow_block_ids("r") == [0, 1, 2]
    # Blocks 0 and 1 (full, computed) are still in the prefix cache: only block 2 is copied back,
    # into the least recently freed block (4; the table was freed tail first: 3, 2, 1, 0).
    pairs = swap.swap_in(request)
    assert pairs == [(2, 4)] and kv.get_block_ids("r") == [0, 1, 4]
    assert swap.slow_block_ids("r") == [] and swap.num_free_blocks == 2  # released until next step
    swap.begin_step()
    assert swap.num_free_blocks == 5 and (swap.num_swap_outs, swap.num_swap_ins) == (1, 1)
    assert (swap.num_blocks_swapped_out, swap.num_blocks_swapped_in) == (3, 1)
    # A request that does not fit in the slow tier is not swapped.
    big = make_request("big", range(30, 54), max_tokens=2)
    kv.free(request)
    kv.allocate_slots(big, 24)
    big.num_computed_tokens = 24
    assert swap.num_blocks_to_swap_out(big) == 6 and not swap.can_swap_out(big) and not swap.prefer_swap(big)


def test_swap_in_fails_without_changes_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    swap = SwapManager(4, kv)
    a, b = make_request("a", range(3, 11)), make_request("b", range(20, 28))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    swap.swap_out(a)
    kv.allocate_slots(b, 8)  # 2 of 3 blocks taken
    assert swap.swap_in(a) is None
    assert swap.slow_block_ids("a") == [0, 1] and kv.get_block_ids("a") == [] and kv.num_free_blocks == 1


def test_cost_model_compares_moving_the_blocks_with_recomputing_the_tokens():
    profile = PrefillProfile(((1, 0.001), (100, 0.1)))
    # 1 MB per block at 1 GB/s: 1 ms per block each way.
    model = SwapCostModel(bytes_per_block=10**6, bandwidth_bytes_per_s=1e9, prefill_profile=profile)
    assert model.swap_time_s(3) == pytest.approx(0.003)
    assert model.recompute_time_s(50) == pytest.approx(0.001 + 49 * 0.099 / 99)
    assert model.prefer_swap(num_blocks=3, num_tokens=50)        # 6 ms < 50 ms
    assert not model.prefer_swap(num_blocks=30, num_tokens=50)   # 60 ms > 50 ms
    assert SwapCostModel(10**6, 1e9).prefer_swap(1000, 1)        # no profile: recompute cost unknown


def test_mlfq_swaps_a_paused_job_out_for_a_new_arrival_and_back_in_when_it_ranks_first():
    clock = FakeClock()
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_num_seqs=1, policy=mlfq(), clock=clock,
                               num_swap_blocks=4, swap_lookahead=0)
    runner = FakeRunner(scheduler, clock=clock)
    a = make_request("A", range(3, 9), max_tokens=4, arrival_time=0.0)
    b = make_request("B", range(20, 27), max_tokens=2, arrival_time=1.0)
    scheduler.add_request(a)
    rows = []
    while scheduler.has_unfinished_requests():
        if clock.now == 1.0:
            scheduler.add_request(b)
        output, _ = step(scheduler, runner)
        rows.append(trace_row(output))
    assert rows == [
        ([("A", 0, 6, [0, 1])], [], [], []),                       # t0: A prefills, drops to level 1
        ([("B", 0, 7, [2, 1])], [(0, 0), (1, 1)], [], []),         # t1: B (level 0) needs A's memory
        ([("A", 6, 1, [0, 1])], [(2, 2), (1, 3)], [(1, 1)], []),   # t2: A ranks first (entered level 1
        ([("A", 7, 1, [0, 1])], [], [], []),                       #     earlier): back in, block 0 a cache hit
        ([("B", 7, 1, [2, 1])], [(0, 0), (1, 1)], [(3, 1)], []),   # t4: A drops to level 2; B back in
        ([("A", 8, 1, [0, 1, 2])], [], [(1, 1)], []),
    ]
    assert (scheduler.swap.num_swap_outs, scheduler.swap.num_swap_ins, scheduler.num_preemptions) == (3, 3, 3)
    assert a.output_token_ids == reference_tokens(list(range(3, 9)), 4)
    assert b.output_token_ids == reference_tokens(list(range(20, 27)), 2)
    assert a.num_preemptions == 2 and b.num_preemptions == 1
    assert_all_free(scheduler)


def test_proactive_swap_out_beyond_the_lookahead_and_prefetch_within_it():
    clock = FakeClock()
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=1, policy=mlfq(), clock=clock,
                               num_swap_blocks=8, swap_lookahead=1)
    runner = FakeRunner(scheduler, clock=clock)
    a = make_request("A", range(3, 11), max_tokens=3, arrival_time=0.0)
    b = make_request("B", range(20, 28), max_tokens=2, arrival_time=1.0)
    c = make_request("C", range(40, 48), max_tokens=2, arrival_time=1.0)
    scheduler.add_request(a)
    rows, lists = [], []
    while scheduler.has_unfinished_requests():
        if clock.now == 1.0:
            scheduler.add_request(b)
            scheduler.add_request(c)
        output, _ = step(scheduler, runner)
        rows.append(trace_row(output) + (output.prefetched_request_ids,))
        lists.append(([r.request_id for r in scheduler.running], [r.request_id for r in scheduler.swapped]))
    assert rows == [
        ([("A", 0, 8, [0, 1])], [], [], [], []),
        # t1: B runs; C (rank 1, in the look-ahead) will want 2 blocks and B one more: 2 free, so
        # A (rank 2, beyond it) is swapped out before memory runs out.
        ([("B", 0, 8, [2, 3])], [(0, 0), (1, 1)], [], [], []),
        # t2: C runs; A (rank 2 -> 1 now that B left level 0) is prefetched into free blocks (both
        # still cached: nothing to copy) and B, now beyond the look-ahead, is swapped out.
        ([("C", 0, 8, [4, 5])], [(2, 2), (3, 3)], [], [], ["A"]),
        ([("A", 8, 1, [0, 1, 3])], [(4, 4), (5, 5)], [], [], []),
        ([("A", 9, 1, [0, 1, 3])], [], [], [(3, 5)], ["B"]),
        ([("B", 8, 1, [2, 5, 4])], [], [], [(4, 3), (5, 1)], ["C"]),
        ([("C", 8, 1, [3, 1, 0])], [], [], [], []),
    ]
    assert lists[1] == (["B"], ["A"]) and lists[2] == (["C", "A"], ["B"])
    for request in (a, b, c):
        assert request.output_token_ids == reference_tokens(request.prompt_token_ids, request.sampling_params.max_tokens)
    assert_all_free(scheduler)


@pytest.mark.parametrize("bandwidth, swapped", [(1e12, True), (1.0, False)])
def test_victim_is_swapped_or_recomputed_by_comparing_costs(bandwidth, swapped):
    profile = PrefillProfile(((1, 0.01), (64, 0.1)))
    clock = FakeClock()
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_num_seqs=1, policy=mlfq(), clock=clock,
                               num_swap_blocks=4, swap_lookahead=0, caching=False,
                               swap_cost_model=SwapCostModel(4096, bandwidth, profile))
    runner = FakeRunner(scheduler, clock=clock)
    a = make_request("A", range(3, 9), max_tokens=4, arrival_time=0.0)
    b = make_request("B", range(20, 27), max_tokens=2, arrival_time=1.0)
    scheduler.add_request(a)
    step(scheduler, runner)
    scheduler.add_request(b)
    output, _ = step(scheduler, runner)
    if swapped:
        assert output.swapped_out_request_ids == ["A"] and output.preempted_request_ids == []
        assert a.status is RequestStatus.SWAPPED and a.num_computed_tokens == 6
    else:
        assert output.preempted_request_ids == ["A"] and output.swap_out_blocks == []
        assert a.status is RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert a.output_token_ids == reference_tokens(list(range(3, 9)), 4)
    assert_all_free(scheduler)


def test_aborting_or_finishing_a_swapped_request_releases_its_slow_blocks():
    clock = FakeClock()
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_num_seqs=1, policy=mlfq(), clock=clock,
                               num_swap_blocks=4, swap_lookahead=0)
    runner = FakeRunner(scheduler, clock=clock)
    a = make_request("A", range(3, 9), max_tokens=4, arrival_time=0.0)
    b = make_request("B", range(20, 27), max_tokens=2, arrival_time=1.0)
    scheduler.add_request(a)
    step(scheduler, runner)
    scheduler.add_request(b)
    step(scheduler, runner)
    assert scheduler.swapped == [a] and scheduler.swap.slow_block_ids("A") == [0, 1]
    scheduler.abort_requests("A")
    assert a.status is RequestStatus.FINISHED_ABORTED and scheduler.swapped == []
    check_invariants(scheduler)
    assert scheduler.swap.pool.num_released_blocks == 2
    output, _ = step(scheduler, runner)
    assert output.finished_request_ids == ["A"] and scheduler.swap.num_free_blocks == 4
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert_all_free(scheduler)
