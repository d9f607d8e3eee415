"""Random workloads under every policy, with and without a slow tier: every request finishes with
exactly the tokens it would get alone, and no block is leaked or double-owned in either tier."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling_fakes import (FakeClock, FakeRunner, assert_all_free, make_request, make_scheduler, reference_tokens,
                              step)
from frugal.core.policy import make_policy
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.swap import SwapCostModel
from frugal.request import RequestStatus

PROFILE = PrefillProfile(((1, 0.5), (16, 2.0)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workloads_under_every_policy_and_swap_setting(data):
    name = data.draw(st.sampled_from(["fcfs", "mlfq", "skip-join-mlfq", "sjf-oracle"]), label="policy")
    options = {}
    if name in ("mlfq", "skip-join-mlfq"):
        options = {"quantum_s": data.draw(st.sampled_from([0.5, 1.0, 3.0]), label="quantum_s"),
                   "num_levels": data.draw(st.integers(1, 4), label="num_levels"),
                   "starvation_s": data.draw(st.sampled_from([2.0, 6.0, float("inf")]), label="starvation_s")}
        if name == "skip-join-mlfq":
            options["prefill_profile"] = PROFILE
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    num_blocks = data.draw(st.integers(3, 12), label="num_blocks")
    capacity = num_blocks * block_size
    num_swap_blocks = data.draw(st.sampled_from([0, 2, 8, 32]), label="num_swap_blocks")
    bandwidth = data.draw(st.sampled_from([None, 1.0, 1e9]), label="bandwidth")
    cost_model = SwapCostModel(1000, bandwidth, PROFILE) if bandwidth else None
    clock = FakeClock()
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=block_size,
                               max_num_seqs=data.draw(st.integers(1, 4), label="max_num_seqs"),
                               max_num_batched_tokens=data.draw(st.integers(1, 16), label="budget"),
                               caching=data.draw(st.booleans(), label="caching"), policy=make_policy(name, **options),
                               num_swap_blocks=num_swap_blocks, swap_cost_model=cost_model,
                               swap_lookahead=data.draw(st.integers(0, 3), label="lookahead"), clock=clock)
    rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))  # per-step choices
    runner = FakeRunner(scheduler, clock=clock, step_time=lambda output: rng.choice([0.25, 1.0, 2.5]))
    base = data.draw(st.lists(st.integers(3, 6), min_size=12, max_size=12), label="base")
    pending = []
    for index in range(data.draw(st.integers(2, 8), label="num_requests")):
        prompt_len = data.draw(st.integers(1, min(12, capacity - 1)))
        shared = data.draw(st.integers(0, prompt_len))
        prompt = base[:shared] + data.draw(st.lists(st.integers(3, 6), min_size=prompt_len - shared,
                                                    max_size=prompt_len - shared))
        max_tokens = data.draw(st.integers(1, min(6, capacity - prompt_len)))
        arrival_step = data.draw(st.integers(0, 8))
        pending.append((arrival_step, make_request(f"r{index}", prompt, max_tokens=max_tokens,
                                                   oracle_output_len=max_tokens, arrival_time=-1.0)))
    abort_rate = data.draw(st.sampled_from([0.0, 0.05]), label="abort_rate")
    spec_rate = data.draw(st.sampled_from([0.0, 0.5]), label="spec_rate")
    aborted: set[str] = set()
    for step_index in range(600):
        for arrival_step, request in pending:
            if arrival_step == step_index:
                request.arrival_time = clock.now
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
    if num_swap_blocks == 0:
        assert scheduler.swap.num_swap_outs == 0 and runner.num_blocks_swapped == [0, 0]
