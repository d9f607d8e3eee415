"""MLFQ and skip-join MLFQ through the real Scheduler: exact traces with a fake clock and fake step
times (queue levels, demotion, iteration-level preemption, skip-join placement, promotion)."""

from __future__ import annotations

from scheduling_fakes import FakeClock, FakeRunner, assert_all_free, make_request, make_scheduler, reference_tokens, step
from frugal.core.mlfq import MLFQPolicy, SkipJoinMLFQPolicy
from frugal.core.prefill_profile import PrefillProfile

INF = float("inf")
PROFILE = PrefillProfile(((1, 1.0), (100, 10.0)))  # predicted prefill: 1 s + (n - 1) / 11 s


def test_levels_demotion_and_iteration_level_preemption():
    """One seat, quantum 1 s, every step 1 s. A drops a level after each quantum it uses up; B
    arriving at level 0 preempts A between two iterations, while A stays resident (KV kept)."""
    clock = FakeClock()
    policy = MLFQPolicy(quantum_s=1.0, num_levels=3, starvation_s=INF)
    scheduler = make_scheduler(max_num_seqs=1, policy=policy, clock=clock)
    runner = FakeRunner(scheduler, clock=clock)
    a = make_request("A", [1, 2, 3], max_tokens=8, arrival_time=0.0)
    b = make_request("B", [4, 5, 6], max_tokens=4, arrival_time=1.0)
    scheduler.add_request(a)
    served, levels = [], []
    a_blocks_while_paused = None
    while scheduler.has_unfinished_requests():
        if clock.now == 1.0:
            scheduler.add_request(b)
        output, _ = step(scheduler, runner)
        served.append("".join(s.request_id for s in output.scheduled))
        levels.append((a.queue_level, b.queue_level))
        if served[-1] == "B" and a_blocks_while_paused is None:
            a_blocks_while_paused = scheduler.kv_cache_manager.get_block_ids("A")
            assert a in scheduler.running and a.num_computed_tokens == 3  # paused, KV resident
    assert served == ["A", "B", "A", "A", "B", "B", "A", "A", "A", "A", "A", "B"]
    # Level 1's quantum (2 s) lets A run twice before it drops to level 2 (the last: no further drop).
    assert levels[:7] == [(1, 0), (1, 1), (1, 1), (2, 1), (2, 1), (2, 2), (2, 2)]
    assert a_blocks_while_paused == [0] and policy.num_demotions == 4 and scheduler.num_preemptions == 0
    assert a.output_token_ids == reference_tokens([1, 2, 3], 8) and b.output_token_ids == reference_tokens([4, 5, 6], 4)
    assert (a.finished_time, b.finished_time) == (11.0, 12.0)
    assert_all_free(scheduler)


def run_three_prompts(policy_cls) -> tuple[dict, list, dict]:
    """L (40-token prompt), M (12) and S (1) arrive together; a step lasts the profile's prefill time
    of its largest chunk, so L's prefill is a 4.5 s iteration."""
    clock = FakeClock()
    policy = policy_cls(quantum_s=1.0, num_levels=4, starvation_s=INF, prefill_profile=PROFILE)
    scheduler = make_scheduler(max_num_seqs=1, policy=policy, clock=clock)
    runner = FakeRunner(scheduler, clock=clock,
                        step_time=lambda output: max(PROFILE.time_s(s.num_new_tokens) for s in output.scheduled))
    requests = [make_request("L", range(3, 43), max_tokens=2, arrival_time=0.0),
                make_request("M", range(50, 62), max_tokens=2, arrival_time=0.1),
                make_request("S", [5], max_tokens=2, arrival_time=0.2)]
    for request in requests:
        scheduler.add_request(request)
    join_levels = {r.request_id: r.queue_level for r in requests}
    served = []
    while scheduler.has_unfinished_requests():
        output, _ = step(scheduler, runner)
        served.append([(s.request_id, s.num_new_tokens) for s in output.scheduled])
    assert_all_free(scheduler)
    jct = {r.request_id: round(r.finished_time - r.arrival_time, 6) for r in requests}
    return join_levels, served, jct


def test_skip_join_places_long_prompts_low_so_short_jobs_are_not_blocked():
    levels, served, jct = run_three_prompts(MLFQPolicy)
    assert levels == {"L": 0, "M": 0, "S": 0}
    assert served == [[("L", 40)], [("M", 12)], [("S", 1)], [("L", 1)], [("M", 1)], [("S", 1)]]
    # Predicted prefill: L 1 + 39/11 = 4.55 s (quantum 8 at level 3), M 2.0 s (level 1), S 1 s (level 0).
    levels, served, skip_join_jct = run_three_prompts(SkipJoinMLFQPolicy)
    assert levels == {"L": 3, "M": 1, "S": 0}
    assert served == [[("S", 1)], [("M", 12)], [("S", 1)], [("M", 1)], [("L", 40)], [("L", 1)]]
    assert skip_join_jct["S"] < jct["S"] and skip_join_jct["M"] < jct["M"]
    assert sum(skip_join_jct.values()) < sum(jct.values())


def test_starved_job_is_promoted_to_the_top_queue():
    def first_service_after_three(starvation_s: float) -> tuple[float, int]:
        clock = FakeClock()
        policy = MLFQPolicy(quantum_s=1.0, num_levels=3, starvation_s=starvation_s)
        scheduler = make_scheduler(max_num_seqs=1, policy=policy, clock=clock)
        runner = FakeRunner(scheduler, clock=clock)
        a = make_request("A", [1, 2, 3], max_tokens=12, arrival_time=0.0)
        scheduler.add_request(a)
        for index in range(7):  # a short job arrives every second from t = 3 to t = 9
            short = make_request(f"s{index}", [9, index + 3], max_tokens=2, arrival_time=3.0 + index)
            while clock.now < short.arrival_time:
                step(scheduler, runner)
            scheduler.add_request(short)
            output, _ = step(scheduler, runner)
            if "A" in [s.request_id for s in output.scheduled]:
                return output.scheduled_at, policy.num_promotions
        while scheduler.has_unfinished_requests():
            output, _ = step(scheduler, runner)
            if "A" in [s.request_id for s in output.scheduled]:
                return output.scheduled_at, policy.num_promotions
        raise AssertionError("A never ran again")

    # A used 3 s (levels 0, 1, 1) and sits at level 2 from t = 3. Without promotion it waits until
    # the 7 short jobs have run their 14 steps at levels 0 and 1 (t = 3 .. 16); with a 2.5 s bound
    # it is back at level 0, and served, at t = 6.
    assert first_service_after_three(2.5) == (6.0, 1)
    assert first_service_after_three(INF) == (17.0, 0)
