"""Prompt lookup, the adaptive length policy and the SpecConfig parser."""

from __future__ import annotations

import pytest

from frugal.config import SpecConfig
from frugal.errors import ConfigError
from frugal.spec.adaptive import AdaptiveLength, best_length, expected_tokens
from frugal.spec.ngram import lookup_continuation


def test_lookup_copies_what_followed_the_latest_match_of_the_longest_suffix():
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # Suffix (6, 7): latest earlier match at index 6 -> followed by 2, 3, 6.
    assert lookup_continuation(tokens, max_n=3, min_n=1, k=3) == [2, 3, 6]
    # A trigram (3, 6, 7) never occurred before; n falls back to 2.
    assert lookup_continuation(tokens, max_n=3, min_n=3, k=3) == []


def test_lookup_without_a_match_proposes_nothing():
    assert lookup_continuation([1, 2, 3, 4], max_n=2, min_n=1, k=4) == []
    assert lookup_continuation([7], max_n=3, min_n=1, k=4) == []


def test_expected_tokens_matches_the_geometric_sum():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_best_length_is_zero_when_speculation_cannot_pay():
    assert best_length(0.02, 5, verify_cost=0.1, draft_cost=0.25) == 0
    assert best_length(0.95, 5, verify_cost=0.1, draft_cost=0.0) == 5


def test_adaptive_length_shrinks_to_off_and_probes_again():
    policy = AdaptiveLength(k_max=4, verify_cost=0.1, draft_cost=0.25, probe_interval=3)
    assert policy.next_length("r") > 0
    for _ in range(10):
        policy.observe("r", 4, 0)
    lengths = [policy.next_length("r") for _ in range(6)]
    assert lengths == [0, 0, 1, 0, 0, 1]
    for _ in range(10):
        policy.observe("r", 4, 4)
    assert policy.next_length("r") == 4


def test_adaptive_off_keeps_k_max():
    policy = AdaptiveLength(k_max=3, verify_cost=0.1, draft_cost=0.25, enabled=False)
    for _ in range(10):
        policy.observe("r", 3, 0)
    assert policy.next_length("r") == 3


def test_spec_config_parse():
    assert SpecConfig.parse("ngram:n=4,k=6") == SpecConfig("ngram", num_speculative_tokens=6, ngram_max=4)
    assert SpecConfig.parse("draft:/m/d,k=2,adaptive=off") == SpecConfig("draft", "/m/d", 2, adaptive=False)
    assert SpecConfig.parse(None) is None
    with pytest.raises(ConfigError, match="integer"):
        SpecConfig.parse("ngram:k=x")
    with pytest.raises(ConfigError, match="exceeds"):
        SpecConfig.parse("ngram:n=2,min_n=3")
    with pytest.raises(ConfigError, match="takes no model"):
        SpecConfig.parse("ngram:/some/dir")


def test_lookup_continues_a_repetition_past_the_end():
    assert lookup_continuation([9, 4, 4, 4, 4], max_n=2, min_n=1, k=5) == [4, 4, 4, 4, 4]
    assert lookup_continuation([1, 2, 1, 2, 1, 2], max_n=2, min_n=1, k=5) == [1, 2, 1, 2, 1]
