"""Trace replay through the real engine (stories260K), and the simulator configured like it: with
every request arriving at once under FCFS the scheduling decisions do not depend on timing, so the
simulator must take exactly the real engine's steps."""

from __future__ import annotations

import random
import time

import pytest
import torch

from frugal.bench.trace import TraceRequest, synthetic_prompt
from frugal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from frugal.sim.clock import SkippingClock, VirtualClock
from frugal.sim.replay import engine_config_for, make_engine, replay
from frugal.sim.simulator import sim_config_from_engine, simulate
from frugal.sim.step_time import StepTimeModel


@pytest.fixture()
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def engine_config(model, **scheduler) -> EngineConfig:
    return EngineConfig(model=ModelConfig(str(model)), cache=CacheConfig(kv_cache_memory_bytes=64 * 20480),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=512,
                                                  **scheduler))


def workload(count: int, vocab_size: int, spread_s: float) -> tuple[list[TraceRequest], list[list[int]]]:
    rng = random.Random(0)
    requests = [TraceRequest(rng.uniform(0, spread_s), rng.randint(8, 120), rng.randint(1, 24)) for _ in range(count)]
    prompts = [synthetic_prompt(r.prompt_len, vocab_size, rng) for r in requests]
    return requests, prompts


def test_skipping_and_virtual_clocks():
    clock = SkippingClock("wall")
    start = clock()
    clock.skip_to(start + 100.0)
    assert 100.0 <= clock() - start < 101.0 and clock.skipped_s == pytest.approx(100.0, abs=0.5)
    clock.skip_to(start)  # the past: nothing happens
    assert clock() - start >= 100.0
    cpu = SkippingClock("cpu")
    assert cpu.elapsed() == pytest.approx(time.process_time(), abs=0.5)
    virtual = VirtualClock()
    virtual.advance(1.5)
    virtual.skip_to(1.0)
    assert virtual() == 1.5


def test_replay_generates_every_trace_request_exactly(stories260k, one_thread):
    engine, clock = make_engine(engine_config(stories260k, policy="sjf-oracle"), "cpu")
    requests, prompts = workload(10, engine.arch.vocab_size, spread_s=0.05)
    requests.append(TraceRequest(30.0, 5, 2))  # after an idle gap: skipped, not slept
    prompts.append([1, 5, 6, 7, 8])
    started = time.perf_counter()
    result = replay(engine, clock, requests, prompts)
    assert time.perf_counter() - started < 30.0 and result.skipped_s > 20.0
    assert sorted(r.request_id for r in result.records) == sorted(f"r{i}" for i in range(11))
    for record in result.records:
        index = int(record.request_id[1:])
        assert (record.prompt_len, record.output_len) == (requests[index].prompt_len, requests[index].output_len)
        assert record.arrival_s == pytest.approx(requests[index].arrival_s)
        assert 0 < record.ttft_s <= record.jct_s
    assert len(result.step_samples) == result.num_steps and all(seconds > 0 for _, seconds in result.step_samples)
    assert not engine.has_unfinished_requests()


def test_simulator_takes_the_real_engines_steps_when_timing_cannot_matter(stories260k, one_thread):
    engine, clock = make_engine(engine_config(stories260k), "cpu")
    requests, prompts = workload(12, engine.arch.vocab_size, spread_s=0.0)  # all at t = 0
    real = replay(engine, clock, requests, prompts)
    model = StepTimeModel.fit(real.step_samples)
    sim = simulate(requests, sim_config_from_engine(engine), model)
    assert sim.num_steps == real.num_steps
    # Step for step the same batch: requests, tokens, attention work and queue length.
    assert sim.step_features == [features for features, _ in real.step_samples]
    assert sorted(r.request_id for r in sim.records) == sorted(r.request_id for r in real.records)


def test_engine_config_for_swaps_the_policy_and_validates_its_options(stories260k):
    base = engine_config(stories260k)
    config = engine_config_for(base, "mlfq", {"quantum_s": 0.01})
    assert config.scheduler.policy == "mlfq" and config.scheduler.policy_options == {"quantum_s": 0.01}
    assert base.scheduler.policy == "fcfs"
    with pytest.raises(ValueError, match="no option"):
        engine_config_for(base, "fcfs", {"quantum_s": 0.01})
