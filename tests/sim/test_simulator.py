"""The discrete-event simulator: the real Scheduler and policies on a virtual clock with a step-time
model. Exact event timing against hand-computed traces, swapping without leaks, and the policy
ordering the simulator exists to show."""

from __future__ import annotations

import random

import pytest

from scheduling_fakes import assert_all_free
from frugal.bench.trace import TraceRequest
from frugal.config import SchedulerConfig
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.swap import SwapCostModel
from frugal.sim.metrics import summarize
from frugal.sim.simulator import SimConfig, simulate
from frugal.sim.step_time import StepTimeModel

ONE_SECOND_PER_STEP = StepTimeModel((1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))


def config(policy: str = "fcfs", max_num_seqs: int = 8, num_blocks: int = 64, **options) -> SimConfig:
    return SimConfig(scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=64,
                                               policy=policy, policy_options=options),
                     block_size=4, num_blocks=num_blocks)


def by_id(records) -> dict:
    return {r.request_id: r for r in records}


def test_events_on_the_virtual_clock():
    # r0 alone: prefill step [0, 1), 3 tokens at t = 1, 2, 3. r1 arrives during r0's life and joins
    # the batch; r2 arrives after an idle gap, which the clock jumps over.
    requests = [TraceRequest(0.0, 5, 3), TraceRequest(1.5, 4, 2), TraceRequest(10.25, 6, 1)]
    result = simulate(requests, config(), ONE_SECOND_PER_STEP)
    records = by_id(result.records)
    assert [(records[i].first_token_s, records[i].finished_s) for i in ("r0", "r1", "r2")] == \
        [(1.0, 3.0), (3.0, 4.0), (11.25, 11.25)]
    assert records["r1"].jct_s == 2.5 and records["r2"].ttft_s == 1.0
    assert result.num_steps == 5 and result.simulated_s == 11.25 and result.max_concurrency == 2
    assert all(r.output_len == requests[int(r.request_id[1:])].output_len for r in result.records)


def test_mlfq_trace_matches_the_scheduler_exact_trace():
    """The two-job MLFQ trace of tests/core/test_policy_mlfq.py, through the simulator."""
    requests = [TraceRequest(0.0, 3, 8), TraceRequest(1.0, 3, 4)]
    sim = config("mlfq", max_num_seqs=1, quantum_s=1.0, num_levels=3, starvation_s=float("inf"))
    records = by_id(simulate(requests, sim, ONE_SECOND_PER_STEP).records)
    assert (records["r0"].finished_s, records["r1"].finished_s) == (11.0, 12.0)


def test_simulated_swapping_finishes_every_request_and_frees_both_tiers():
    rng = random.Random(0)
    requests = [TraceRequest(rng.uniform(0, 1), rng.randint(4, 30), rng.randint(1, 20)) for _ in range(40)]
    profile = PrefillProfile(((1, 0.01), (64, 0.1)))
    sim = SimConfig(scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                              policy="skip-join-mlfq", policy_options={"quantum_s": 0.05}),
                    block_size=4, num_blocks=24, num_swap_blocks=64, prefill_profile=profile,
                    swap_cost_model=SwapCostModel(4096, 1e9, profile))
    step_time = StepTimeModel((0.01, 0.001, 0.0001, 0.0, 0.0, 0.0, 0.0))
    result = simulate(requests, sim, step_time)
    assert len(result.records) == 40 and sum(r.num_preemptions for r in result.records) > 0
    assert all(r.first_token_s <= r.finished_s for r in result.records)
    scheduler = result.scheduler
    assert scheduler.swap.num_swap_outs > 0 and scheduler.swap.num_swap_ins == scheduler.swap.num_swap_outs
    assert_all_free(scheduler)


def heavy_tailed_trace(count: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    rng = random.Random(seed)
    now, requests = 0.0, []
    for _ in range(count):
        now += rng.expovariate(rate)
        requests.append(TraceRequest(now, rng.randint(2, 8), min(50, int(rng.paretovariate(1.2)))))
    return requests


def test_size_aware_scheduling_beats_fcfs_on_heavy_tailed_jobs_at_high_load():
    # One seat, one second per step: offered load about 0.9 of capacity.
    requests = heavy_tailed_trace(300, rate=0.25)
    results = {policy: summarize(simulate(requests, config(policy, max_num_seqs=1), ONE_SECOND_PER_STEP).records)
               for policy in ("fcfs", "sjf-oracle")}
    assert results["sjf-oracle"]["jct_s"]["mean"] < 0.8 * results["fcfs"]["jct_s"]["mean"]
    assert results["sjf-oracle"]["num_requests"] == results["fcfs"]["num_requests"] == 300


def test_simulation_refuses_a_config_it_cannot_run():
    with pytest.raises(ValueError, match="needs quantum_s or a prefill profile"):
        simulate([TraceRequest(0.0, 3, 1)], config("mlfq"), ONE_SECOND_PER_STEP)
