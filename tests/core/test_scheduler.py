"""Scheduler (FCFS): exact traces driven by a fake runner that keeps a simulated paged KV cache
(`tests/scheduling_fakes.py`): a wrong block table, a bad prefix-cache hit or a speculative position
left stale shows up as a wrong token or a failed assertion."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scheduling_fakes as fakes
from scheduling_fakes import FakeRunner, Model, assert_all_free, make_request, make_scheduler, reference_tokens
from frugal.config import SchedulerConfig
from frugal.core.policy import FCFSPolicy, make_policy
from frugal.core.scheduler import Scheduler
from frugal.core.scheduler_output import SchedulerOutput
from frugal.errors import ConfigError, InvalidRequestError
from frugal.request import Request, RequestStatus


def check_invariants(scheduler: Scheduler, output=None) -> None:
    fakes.check_invariants(scheduler, output)
    if isinstance(scheduler.policy, FCFSPolicy):
        assert len(scheduler.running) <= scheduler.config.max_num_seqs  # FCFS never pauses


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    output, updated = fakes.step(scheduler, runner)
    check_invariants(scheduler, output)
    return output, updated


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 500) -> list[list[tuple]]:
    trace = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        output, _ = step(scheduler, runner)
        trace.append([(s.request_id, s.start_pos, s.num_new_tokens, s.needs_sample) for s in output.scheduled])
    assert_all_free(scheduler)
    return trace


def test_continuous_batching_request_joins_mid_flight():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    a = make_request("a", range(5), max_tokens=3)
    scheduler.add_request(a)
    out1, updated = step(scheduler, runner)
    assert [(s.request_id, s.start_pos, s.num_new_tokens, s.token_ids) for s in out1.scheduled] == \
        [("a", 0, 5, [0, 1, 2, 3, 4])]
    assert updated == [a] and a.num_output_tokens == 1 and a.first_token_time is not None
    b = make_request("b", [7, 8, 9], max_tokens=2)
    scheduler.add_request(b)
    out2, _ = step(scheduler, runner)
    assert [(s.request_id, s.start_pos, s.num_new_tokens) for s in out2.scheduled] == [("a", 5, 1), ("b", 0, 3)]
    assert out2.scheduled[0].token_ids == [a.output_token_ids[0]]
    out3, updated = step(scheduler, runner)
    assert [(s.request_id, s.start_pos, s.num_new_tokens) for s in out3.scheduled] == [("a", 6, 1), ("b", 3, 1)]
    assert a.status is RequestStatus.FINISHED_LENGTH and b.status is RequestStatus.FINISHED_LENGTH
    assert set(updated) == {a, b} and scheduler.num_running == 0
    out4 = scheduler.schedule()
    assert out4.is_empty and sorted(out4.finished_request_ids) == ["a", "b"]
    assert scheduler.schedule().finished_request_ids == []  # reported once
    assert a.output_token_ids == reference_tokens(list(range(5)), 3)
    assert b.output_token_ids == reference_tokens([7, 8, 9], 2)
    assert_all_free(scheduler)


def test_chunked_prefill_under_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", range(20), max_tokens=3))
    scheduler.add_request(make_request("b", range(30, 36), max_tokens=2))
    trace = run_to_completion(scheduler, FakeRunner(scheduler))
    assert trace == [
        [("a", 0, 8, False)],
        [("a", 8, 8, False)],
        [("a", 16, 4, True), ("b", 0, 4, False)],
        [("a", 20, 1, True), ("b", 4, 2, True)],
        [("a", 21, 1, True), ("b", 6, 1, True)],
    ]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10, max_model_len=10, chunked=False)
    scheduler.add_request(make_request("a", range(6), max_model_len=10, max_tokens=2))
    scheduler.add_request(make_request("b", range(10, 16), max_model_len=10, max_tokens=2))
    trace = run_to_completion(scheduler, FakeRunner(scheduler))
    assert trace == [[("a", 0, 6, True)], [("a", 6, 1, True), ("b", 0, 6, True)], [("b", 6, 1, True)]]


def test_same_step_prefix_hit_on_blocks_an_earlier_entry_computes():
    scheduler = make_scheduler(block_size=4)
    a = make_request("a", range(6), max_tokens=2)
    b = make_request("b", range(6), max_tokens=2)
    scheduler.add_request(a)
    scheduler.add_request(b)
    trace = run_to_completion(scheduler, FakeRunner(scheduler))
    assert trace[0] == [("a", 0, 6, True), ("b", 4, 2, True)] and b.num_cached_tokens == 4
    assert a.output_token_ids == b.output_token_ids == reference_tokens(list(range(6)), 2)


def test_max_num_seqs_limits_running():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add_request(make_request(name, [ord(name)] * 3, max_tokens=2))
    trace = run_to_completion(scheduler, FakeRunner(scheduler))
    assert [[entry[0] for entry in step_entries] for step_entries in trace] == [["a", "b"], ["a", "b"], ["c"], ["c"]]


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_by_recompute_picks_last_arrival_and_it_finishes_identically(caching):
    scheduler = make_scheduler(num_blocks=6, block_size=2, caching=caching)
    runner = FakeRunner(scheduler)
    prompts = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11]}
    requests = {name: make_request(name, prompt, max_tokens=5) for name, prompt in prompts.items()}
    for request in requests.values():
        scheduler.add_request(request)
    out1, _ = step(scheduler, runner)
    assert [s.request_id for s in out1.scheduled] == ["a", "b", "c"] and scheduler.num_free_blocks == 0
    out2, _ = step(scheduler, runner)  # a needs a block: c (last arrival) gives way
    c = requests["c"]
    assert out2.preempted_request_ids == ["c"] and [s.request_id for s in out2.scheduled] == ["a", "b"]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_token_ids == reference_tokens(prompts["c"], 1) and scheduler.waiting == [c]
    step(scheduler, runner)
    out4, _ = step(scheduler, runner)  # a needs another block: b gives way, goes before c
    assert out4.preempted_request_ids == ["b"] and [r.request_id for r in scheduler.waiting] == ["b", "c"]
    trace = run_to_completion(scheduler, runner)
    # b re-admitted (with caching: its own first blocks found again), then c, which gives way again.
    b_start, c_start = (4, 4) if caching else (0, 0)
    assert [[entry[:3] for entry in entries] for entries in trace] == [
        [("a", 7, 1)],
        [("b", b_start, 7 - b_start), ("c", 0, 4)],
        [("b", 7, 1)],
        [("c", c_start, 5 - c_start)],
        [("c", 5, 1)],
        [("c", 6, 1)],
    ]
    assert scheduler.num_preemptions == 3 and c.num_preemptions == 2
    for name, request in requests.items():
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == reference_tokens(prompts[name], 5), name
        assert request.num_cached_tokens == 0  # recorded at first admission only


def test_preempted_request_readmitted_with_prefix_hit_keeps_first_num_cached_tokens():
    scheduler = make_scheduler(num_blocks=6, block_size=2, caching=True)
    requests = [make_request(name, prompt, max_tokens=5)
                for name, prompt in {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11]}.items()]
    for request in requests:
        scheduler.add_request(request)
    run_to_completion(scheduler, FakeRunner(scheduler))
    # Re-admitted victims found some of their own freed blocks again: counted in stats only.
    stats = scheduler.kv_cache_manager.prefix_cache_stats
    assert scheduler.num_preemptions == 3
    # 6 admissions (a, b, c; b, c; c again; failed retries are not counted); b and c hit 4 each.
    assert (stats.num_queries, stats.num_query_tokens, stats.num_hit_tokens) == (6, 4 + 4 + 3 + 7 + 4 + 5, 8)
    assert [r.num_cached_tokens for r in requests] == [0, 0, 0]


def test_prefix_cache_hit_is_visible_in_num_cached_tokens():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    a = make_request("a", range(10), max_tokens=2)
    scheduler.add_request(a)
    run_to_completion(scheduler, runner)
    assert a.num_cached_tokens == 0
    b = make_request("b", list(range(8)) + [42, 43, 44], max_tokens=2)
    scheduler.add_request(b)
    out, _ = step(scheduler, runner)
    assert [(s.request_id, s.start_pos, s.num_new_tokens, s.token_ids) for s in out.scheduled] == \
        [("b", 8, 3, [42, 43, 44])]
    assert b.num_cached_tokens == 8 and b.first_scheduled_time is not None
    run_to_completion(scheduler, runner)
    assert b.output_token_ids == reference_tokens(b.prompt_token_ids, 2)
    stats = scheduler.kv_cache_manager.prefix_cache_stats
    assert (stats.num_queries, stats.num_query_tokens, stats.num_hit_tokens) == (2, 21, 8)


def scripted(prompt_len: int, tokens: list[int]) -> Model:
    return lambda context: tokens[len(context) - prompt_len]


@pytest.mark.parametrize("params, script, expected_tokens, status, stop_reason", [
    (dict(), [5, 2, 6], [5, 2], RequestStatus.FINISHED_STOPPED, None),                  # EOS
    (dict(ignore_eos=True), [2, 2, 2, 2, 2], [2, 2, 2, 2], RequestStatus.FINISHED_LENGTH, None),
    (dict(min_tokens=3), [5, 2, 6, 2, 7], [5, 2, 6, 2], RequestStatus.FINISHED_STOPPED, None),
    (dict(min_tokens=3), [2, 2, 2, 2], [2, 2, 2], RequestStatus.FINISHED_STOPPED, None),
    (dict(stop_token_ids=(9,)), [5, 9, 6], [5, 9], RequestStatus.FINISHED_STOPPED, 9),
    (dict(stop_token_ids=(9,), min_tokens=2), [9, 9, 6], [9, 9], RequestStatus.FINISHED_STOPPED, 9),
    (dict(stop_token_ids=(9,), ignore_eos=True), [2, 9], [2, 9], RequestStatus.FINISHED_STOPPED, 9),
    (dict(max_tokens=3), [5, 6, 7, 8], [5, 6, 7], RequestStatus.FINISHED_LENGTH, None),
    (dict(max_tokens=4), [5, 6, 7, 2], [5, 6, 7, 2], RequestStatus.FINISHED_STOPPED, None),  # EOS wins
])
def test_stop_conditions(params, script, expected_tokens, status, stop_reason):
    params.setdefault("max_tokens", 4)
    scheduler = make_scheduler()
    request = make_request("r", [1, 3, 4], eos=(2,), **params)
    scheduler.add_request(request)
    run_to_completion(scheduler, FakeRunner(scheduler, scripted(3, script)))
    assert request.output_token_ids == expected_tokens
    assert request.status is status and request.stop_reason == stop_reason
    assert request.finished_time is not None


def test_max_model_len_and_pool_capacity_end_with_length():
    scheduler = make_scheduler()
    request = make_request("r", range(5), max_model_len=8, max_tokens=None)
    scheduler.add_request(request)
    run_to_completion(scheduler, FakeRunner(scheduler))
    assert request.num_output_tokens == 3 and request.status is RequestStatus.FINISHED_LENGTH

    small = make_scheduler(num_blocks=3, block_size=4)  # 12 tokens in the whole pool
    request = make_request("r", range(5), max_model_len=2048, max_tokens=100)
    small.add_request(request)
    run_to_completion(small, FakeRunner(small))
    assert request.num_tokens == 12 and request.status is RequestStatus.FINISHED_LENGTH


def test_add_request_rejects_prompts_that_cannot_fit_and_duplicates():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(InvalidRequestError, match="8 tokens plus one output token.*2 blocks x 4 tokens = 8"):
        scheduler.add_request(make_request("big", range(8)))
    scheduler.add_request(make_request("ok", range(7)))
    with pytest.raises(InvalidRequestError, match="'ok'"):
        scheduler.add_request(make_request("ok", range(3)))
    with pytest.raises(InvalidRequestError, match="max_model_len 4"):
        scheduler.add_request(make_request("long", range(4), max_model_len=4))


def test_abort_frees_blocks_and_is_reported_next_step():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    a, b, c = (make_request(n, range(6), max_tokens=5) for n in "abc")
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    scheduler.add_request(c)
    used_before = scheduler.num_used_blocks
    scheduler.abort_requests(["a", "c", "unknown"])  # a running, c waiting
    assert a.status is RequestStatus.FINISHED_ABORTED and c.status is RequestStatus.FINISHED_ABORTED
    assert scheduler.num_used_blocks < used_before and scheduler.get_request("a") is None
    out, _ = step(scheduler, runner)
    assert sorted(out.finished_request_ids) == ["a", "c"] and [s.request_id for s in out.scheduled] == ["b"]
    scheduler.abort_requests("a")  # already finished: ignored
    run_to_completion(scheduler, runner)


def test_runner_entries_for_requests_aborted_meanwhile_are_ignored():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    a = make_request("a", range(6), max_tokens=5)
    scheduler.add_request(a)
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)  # a stop string matched
    assert scheduler.update(output, runner_output) == []
    assert a.output_token_ids == [] and a.status is RequestStatus.FINISHED_STOPPED
    assert scheduler.schedule().finished_request_ids == ["a"]
    assert_all_free(scheduler)


@pytest.mark.parametrize("accepted_count, expected_computed_delta", [(1, 0), (2, 1), (4, 3)])
def test_speculative_rollback_arithmetic(accepted_count, expected_computed_delta):
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    request = make_request("r", range(6), max_tokens=10)
    scheduler.add_request(request)
    step(scheduler, runner)
    truth = reference_tokens(request.all_token_ids, 3)
    drafts = truth[:accepted_count - 1] + [0] * (3 - (accepted_count - 1))
    request.spec_token_ids = list(drafts)[:3]
    num_tokens = request.num_tokens  # 7: computed 6, the sampled token pending
    out, _ = step(scheduler, runner)
    (scheduled,) = out.scheduled
    assert (scheduled.start_pos, scheduled.num_new_tokens) == (6, 4) and scheduled.spec_token_ids == drafts[:3]
    assert scheduled.token_ids == [request.output_token_ids[0]] + drafts[:3]
    assert request.num_tokens == num_tokens + accepted_count and request.spec_token_ids == []
    assert request.num_computed_tokens == num_tokens + expected_computed_delta == request.num_tokens - 1
    run_to_completion(scheduler, runner)
    assert request.output_token_ids == reference_tokens(list(range(6)), 10)


def test_spec_tokens_trimmed_by_budget_and_context_limit():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    request = make_request("r", range(2), max_tokens=20)
    scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    step(scheduler, runner)
    request.spec_token_ids = [50, 51, 52]
    out, _ = step(scheduler, runner)
    assert out.scheduled[0].spec_token_ids == [50, 51] and out.scheduled[0].num_new_tokens == 3

    scheduler = make_scheduler()
    request = make_request("r", range(4), max_model_len=7, max_tokens=None)
    scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    step(scheduler, runner)  # 5 tokens; position 5 could still yield token 7 of max_model_len 7
    request.spec_token_ids = [50, 51, 52]
    out, _ = step(scheduler, runner)
    assert out.scheduled[0].spec_token_ids == [50]
    run_to_completion(scheduler, runner)
    assert request.num_tokens == 7 and request.output_token_ids == reference_tokens(list(range(4)), 3)


def test_policy_factory_and_fcfs_victim():
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    with pytest.raises(ConfigError, match="'lifo'.*fcfs") as info:
        make_policy("lifo")
    assert isinstance(info.value, ValueError)
    policy = FCFSPolicy()
    waiting: list[Request] = []
    first, second, third = (make_request(n, [1]) for n in "xyz")
    policy.add_waiting(waiting, second)
    policy.add_waiting(waiting, third)
    policy.add_waiting(waiting, first)  # older arrival added late: goes first
    assert waiting == [first, second, third]
    late = make_request("late", [1])
    policy.add_preempted(waiting, late)
    assert waiting[0] is late
    assert policy.select_victim([first, third, second]) is third


def test_policy_seam_reorders_running_and_hears_grants():
    class NewestFirst(FCFSPolicy):
        def __init__(self):
            self.grants: list[tuple[str, int]] = []

        def order_running(self, running):
            running.sort(key=lambda r: -r.arrival_time)

        def on_scheduled(self, request, num_new_tokens):
            self.grants.append((request.request_id, num_new_tokens))

    policy = NewestFirst()
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), 4, 64, True, policy)
    scheduler.add_request(make_request("a", range(3), max_tokens=2))
    scheduler.add_request(make_request("b", range(10, 14), max_tokens=2))
    trace = run_to_completion(scheduler, FakeRunner(scheduler))
    assert trace == [[("a", 0, 3, True), ("b", 0, 4, True)], [("b", 4, 1, True), ("a", 3, 1, True)]]
    assert policy.grants == [("a", 3), ("b", 4), ("b", 1), ("a", 1)]


def test_core_never_imports_torch():
    code = "import sys, frugal.core.scheduler, frugal.core.policy; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workloads_finish_exactly_and_free_every_block(data):
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    num_blocks = data.draw(st.integers(3, 12), label="num_blocks")
    capacity = num_blocks * block_size
    budget = data.draw(st.integers(1, 16), label="budget")
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=block_size,
                               max_num_seqs=data.draw(st.integers(1, 4), label="max_num_seqs"),
                               max_num_batched_tokens=budget, caching=data.draw(st.booleans(), label="caching"))
    runner = FakeRunner(scheduler)
    base = data.draw(st.lists(st.integers(3, 6), min_size=12, max_size=12), label="base")
    pending = []
    for index in range(data.draw(st.integers(2, 8), label="num_requests")):
        prompt_len = data.draw(st.integers(1, min(12, capacity - 1)))
        shared = data.draw(st.integers(0, prompt_len))
        prompt = base[:shared] + data.draw(st.lists(st.integers(3, 6), min_size=prompt_len - shared,
                                                    max_size=prompt_len - shared))
        max_tokens = data.draw(st.integers(1, min(6, capacity - prompt_len)))
        pending.append((data.draw(st.integers(0, 8)), make_request(f"r{index}", prompt, max_tokens=max_tokens)))
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))  # per-step choices
    abort_rate = data.draw(st.sampled_from([0.0, 0.02, 0.1]), label="abort_rate")
    spec_rate = data.draw(st.sampled_from([0.0, 0.5]), label="spec_rate")
    aborted: set[str] = set()
    for step_index in range(400):
        for arrival_step, request in pending:
            if arrival_step == step_index:
                scheduler.add_request(request)
        if step_index > 8 and not scheduler.has_unfinished_requests():
            break
        if scheduler.requests and rng.random() < abort_rate:
            victim = rng.choice(sorted(scheduler.requests))
            scheduler.abort_requests([victim])
            aborted.add(victim)
        for request in scheduler.running:  # a proposer: some right drafts, then maybe a wrong one
            if request.num_computed_tokens == request.num_tokens - 1 and rng.random() < spec_rate:
                drafts = reference_tokens(request.all_token_ids, rng.randint(1, 3))
                if rng.random() < 0.5:
                    drafts[rng.randrange(len(drafts))] = 99
                request.spec_token_ids = drafts
        step(scheduler, runner)
    assert_all_free(scheduler)
    for _, request in pending:
        truth = reference_tokens(request.prompt_token_ids, request.sampling_params.max_tokens)
        if request.request_id in aborted:
            assert truth[:request.num_output_tokens] == request.output_token_ids
        else:
            assert request.status is RequestStatus.FINISHED_LENGTH and request.output_token_ids == truth
