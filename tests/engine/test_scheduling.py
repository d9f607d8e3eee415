"""The engine's scheduling setup: policy options at the edge, the prefill profile (loaded or
measured at startup on the real model), the clock and the benchmark-only oracle."""

from __future__ import annotations

import pytest

from frugal import LLM, SamplingParams
from frugal.core.mlfq import SkipJoinMLFQPolicy
from frugal.core.prefill_profile import PrefillProfile
from frugal.engine.scheduling import measure_prefill_profile, profile_lengths
from frugal.errors import ConfigError, InvalidRequestError


def test_profile_lengths():
    assert profile_lengths(511) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 511]
    assert profile_lengths(1) == [1] and profile_lengths(5) == [1, 2, 3, 4, 5]


def test_prefill_profile_measured_on_the_real_model(stories260k):
    llm = LLM(model=str(stories260k))
    engine = llm.engine
    profile = measure_prefill_profile(engine.runner, engine.num_blocks, engine.max_model_len,
                                      engine.arch.vocab_size, repeats=2, lengths=[1, 16, 128])
    assert [n for n, _ in profile.points] == [1, 16, 128]
    times = [t for _, t in profile.points]
    assert times == sorted(times) and times[0] > 0 and profile.metadata["repeats"] == 2
    # The engine is untouched: it still generates.
    assert llm.generate([[1, 5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_skip_join_engine_measures_a_profile_at_startup_or_loads_one(stories260k, tmp_path):
    measured = LLM(model=str(stories260k), max_model_len=64, scheduling_policy="skip-join-mlfq").engine
    policy = measured.scheduler.policy
    assert isinstance(policy, SkipJoinMLFQPolicy) and policy.prefill_profile.points[-1][0] == 63
    assert policy.base_quantum_s == policy.prefill_profile.min_iteration_s
    profile = PrefillProfile(((1, 0.5), (63, 4.0)))
    path = profile.save(tmp_path / "profile.json")
    loaded = LLM(model=str(stories260k), max_model_len=64, scheduling_policy="skip-join-mlfq",
                 policy_options={"prefill_profile": str(path), "quantum_s": 1.0}).engine.scheduler.policy
    assert loaded.prefill_profile == profile and loaded.base_quantum_s == 1.0
    assert loaded.join_level(_request_of(63)) == 2  # 4 s of prefill: quanta 1, 2, 4


def _request_of(num_tokens: int):
    from frugal.request import Request

    return Request("x", [1] * num_tokens, SamplingParams())


@pytest.mark.parametrize("kwargs, message", [
    ({"scheduling_policy": "lottery"}, "unknown scheduling policy 'lottery'"),
    ({"scheduling_policy": "mlfq", "policy_options": {"quantum": 1}}, "no option.* quantum"),
    ({"scheduling_policy": "mlfq", "policy_options": {"quantum_s": -1}}, "quantum_s must be a positive"),
    ({"swap_space": "lots"}, "cannot parse memory size 'lots'"),
])
def test_bad_scheduling_options_fail_at_construction(stories260k, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(stories260k), **kwargs)


def test_engine_clock_and_oracle(stories260k):
    ticks = iter(range(1000))
    llm = LLM(model=str(stories260k), scheduling_policy="sjf-oracle")
    engine = llm.engine
    engine.scheduler.clock = lambda: float(next(ticks))  # a fake clock: every reading one second later
    engine.add_request("a", [1, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True), oracle_output_len=2)
    assert engine.scheduler.get_request("a").oracle_output_len == 2
    arrival = engine.scheduler.get_request("a").arrival_time
    finished = None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            finished = delta.metrics if delta.finish_reason else finished
    assert finished.arrival_time == arrival and finished.first_token_time > arrival
    assert finished.finished_time > finished.first_token_time
    with pytest.raises(InvalidRequestError, match="oracle_output_len"):
        engine.add_request("b", [1, 5], SamplingParams(max_tokens=2), oracle_output_len=-1)
    assert not engine.has_unfinished_requests()


def test_swap_overlap_measurement(stories260k):
    from frugal.engine.scheduling import measure_swap_overlap

    llm = LLM(model=str(stories260k), swap_space=64 * 20480)
    engine = llm.engine
    result = measure_swap_overlap(engine.runner, engine.swapper, num_blocks=8, num_tokens=32,
                                  vocab_size=engine.arch.vocab_size, max_model_len=engine.max_model_len, repeats=2)
    assert result["num_blocks"] == 8 and result["overlap"] == "thread"
    assert all(result[key] > 0 for key in ("copy_s", "step_s", "overlapped_s"))
    assert result["sequential_s"] == result["copy_s"] + result["step_s"]
    assert engine.swapper.num_blocks_in == 0  # measurement copies are not counted as swaps
    assert llm.generate([[1, 5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
