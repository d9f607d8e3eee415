"""Policies in isolation: the factory and its option checks, the prefill profile, rankings."""

from __future__ import annotations

import json

import pytest

from scheduling_fakes import make_request
from frugal.config import SchedulerConfig
from frugal.core.mlfq import MLFQPolicy, SkipJoinMLFQPolicy
from frugal.core.policy import (FCFSPolicy, SJFOraclePolicy, make_policy, policy_names, policy_option_names)
from frugal.core.prefill_profile import PrefillProfile
from frugal.errors import ConfigError

PROFILE = PrefillProfile(((1, 1.0), (100, 10.0)))  # 1 s + 1/11 s per extra token


def test_make_policy_builds_every_policy_with_validated_options():
    assert policy_names() == ["fcfs", "mlfq", "sjf-oracle", "skip-join-mlfq"]
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    mlfq = make_policy("mlfq", quantum_s=0.5, num_levels=3)
    assert isinstance(mlfq, MLFQPolicy) and not isinstance(mlfq, SkipJoinMLFQPolicy)
    assert [mlfq.quantum_s(level) for level in range(3)] == [0.5, 1.0, 2.0]
    assert mlfq.starvation_s == 8 * 2.0  # default: 8 lowest-level quanta
    assert make_policy("mlfq", quantum_s=0.5, starvation_s=float("inf")).starvation_s == float("inf")
    # Default quantum: the profile's fastest iteration.
    assert make_policy("mlfq", prefill_profile=PROFILE).base_quantum_s == 1.0
    skip_join = make_policy("skip-join-mlfq", prefill_profile=PROFILE, quantum_s=0.25)
    assert isinstance(skip_join, SkipJoinMLFQPolicy) and skip_join.base_quantum_s == 0.25
    assert isinstance(make_policy("sjf-oracle"), SJFOraclePolicy)
    assert policy_option_names("mlfq") == ["quantum_s", "num_levels", "starvation_s", "prefill_profile"]
    assert policy_option_names("fcfs") == []
    assert MLFQPolicy.needs_prefill_profile({}) and not MLFQPolicy.needs_prefill_profile({"quantum_s": 1.0})
    assert SkipJoinMLFQPolicy.needs_prefill_profile({"quantum_s": 1.0})
    assert not FCFSPolicy.needs_prefill_profile({}) and not SJFOraclePolicy.needs_prefill_profile({})


@pytest.mark.parametrize("name, options, message", [
    ("lifo", {}, "unknown scheduling policy 'lifo'; known: fcfs, mlfq, sjf-oracle, skip-join-mlfq"),
    ("fcfs", {"quantum_s": 1.0}, "'fcfs' has no option.* quantum_s; known: none"),
    ("mlfq", {"quantm_s": 1.0}, "'mlfq' has no option.* quantm_s; known: quantum_s, num_levels"),
    ("mlfq", {}, "needs quantum_s or a prefill profile"),
    ("mlfq", {"quantum_s": 0}, "quantum_s must be a positive number of seconds, got 0"),
    ("mlfq", {"quantum_s": -1.0}, "quantum_s .* got -1.0"),
    ("mlfq", {"quantum_s": "1"}, "quantum_s .* got '1'"),
    ("mlfq", {"quantum_s": True}, "quantum_s .* got True"),
    ("mlfq", {"quantum_s": float("inf")}, "quantum_s must be finite"),
    ("mlfq", {"quantum_s": 1.0, "num_levels": 0}, r"num_levels must be an integer in \[1, 32\], got 0"),
    ("mlfq", {"quantum_s": 1.0, "num_levels": 2.5}, "num_levels .* got 2.5"),
    ("mlfq", {"quantum_s": 1.0, "starvation_s": 0}, "starvation_s .* got 0"),
    ("mlfq", {"quantum_s": 1.0, "prefill_profile": 3}, "prefill_profile must be a PrefillProfile or a JSON path"),
    ("skip-join-mlfq", {"quantum_s": 1.0}, "'skip-join-mlfq' needs a prefill profile"),
    ("sjf-oracle", {"prefill_profile": "/nonexistent/profile.json"}, "does not exist"),
])
def test_make_policy_rejects_bad_names_and_options(name, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_policy(name, **options)
    assert isinstance(info.value, ValueError)


def test_scheduler_config_checks_policy_and_option_names_at_the_edge():
    assert SchedulerConfig(policy="mlfq", policy_options={"quantum_s": 0.1}).policy_options == {"quantum_s": 0.1}
    with pytest.raises(ConfigError, match="unknown scheduling policy 'nope'"):
        SchedulerConfig(policy="nope")
    with pytest.raises(ConfigError, match="'fcfs' has no option.* quantum_s"):
        SchedulerConfig(policy="fcfs", policy_options={"quantum_s": 0.1})


def test_prefill_profile_interpolates_monotonically_and_extrapolates():
    profile = PrefillProfile(((10, 1.0), (20, 3.0), (40, 4.0)))
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 15: 2.0, 20: 3.0, 30: 3.5, 40: 4.0, 60: 5.0}
    assert {n: pytest.approx(profile.time_s(n)) for n in expected} == expected
    noisy = PrefillProfile(((10, 2.0), (20, 1.0), (30, 3.0)))  # a longer prompt measured faster
    assert noisy.points == ((10, 2.0), (20, 2.0), (30, 3.0)) and noisy.time_s(25) == pytest.approx(2.5)
    single = PrefillProfile(((8, 2.0),))
    assert single.time_s(4) == pytest.approx(1.0) and single.time_s(16) == pytest.approx(4.0)
    assert PrefillProfile.from_samples([(10, 3.0), (10, 1.0), (10, 2.0), (5, 0.5)]).points == ((5, 0.5), (10, 2.0))
    assert profile.min_iteration_s == 1.0


def test_prefill_profile_json_round_trip_and_errors(tmp_path):
    profile = PrefillProfile(((1, 0.002), (64, 0.004), (511, 0.05)), {"model": "stories260K"})
    path = profile.save(tmp_path / "sub" / "profile.json")
    loaded = PrefillProfile.load(path)
    assert loaded == profile and loaded.metadata == {"model": "stories260K"}
    assert make_policy("skip-join-mlfq", prefill_profile=str(path)).prefill_profile == profile
    for points, message in [((), "at least one"), (((2, 1.0), (2, 2.0)), "strictly increase"),
                            (((0, 1.0),), "tokens > 0"), (((3, -1.0),), "seconds >= 0")]:
        with pytest.raises(ConfigError, match=message):
            PrefillProfile(points)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PrefillProfile.load(tmp_path / "bad.json")
    (tmp_path / "nopoints.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConfigError, match="'points'"):
        PrefillProfile.load(tmp_path / "nopoints.json")
    (tmp_path / "garbled.json").write_text(json.dumps({"points": [[1, "x"]]}))
    with pytest.raises(ConfigError, match="bad prefill profile points"):
        PrefillProfile.load(tmp_path / "garbled.json")


def test_skip_join_places_a_job_at_the_first_level_whose_quantum_covers_its_prefill():
    policy = SkipJoinMLFQPolicy(quantum_s=1.0, num_levels=4, prefill_profile=PROFILE)
    # Predicted prefill: 1 + (n - 1) / 11 seconds; quanta 1, 2, 4, 8.
    for prompt_len, level in [(1, 0), (12, 1), (13, 2), (34, 2), (35, 3), (78, 3), (100, 3)]:
        request = make_request(f"p{prompt_len}", range(prompt_len))
        assert policy.join_level(request) == level, prompt_len
        assert policy.state(request).level == level and request.queue_level == level
    plain = MLFQPolicy(quantum_s=1.0, num_levels=4)
    assert plain.join_level(make_request("long", range(100))) == 0


def test_fcfs_and_sjf_rankings():
    a, b, c, d = (make_request(name, [1, 2], max_tokens=max_tokens, oracle_output_len=oracle)
                  for name, max_tokens, oracle in [("a", 20, 9), ("b", 20, 2), ("c", 3, None), ("d", 20, 5)])
    fcfs = FCFSPolicy()
    assert fcfs.rank([b], [d, c], [a], now=0.0) == [b, c, d, a]  # running, swapped by arrival, waiting
    sjf = SJFOraclePolicy()
    # Remaining output: a 9, b 2, c 3 (no oracle: max_tokens), d 5.
    assert sjf.rank([a], [b], [c, d], now=0.0) == [b, c, d, a]
    assert sjf.select_victim([a, b, c, d]) is a
    d.append_output_token_ids([7, 7, 7, 7])  # d has 1 token left: now the shortest
    assert sjf.rank([a, b, c, d], [], [], now=0.0)[0] is d
    # With a prefill profile, an unprefilled prompt counts as prefill time / fastest iteration.
    long_prompt = make_request("long", range(100), oracle_output_len=1)
    with_profile = SJFOraclePolicy(prefill_profile=PROFILE)
    assert with_profile.remaining_iterations(long_prompt) == pytest.approx(1 + 10.0)
    long_prompt.num_computed_tokens = 100
    assert with_profile.remaining_iterations(long_prompt) == 1
