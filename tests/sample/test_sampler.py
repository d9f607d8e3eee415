"""Sampler: greedy, seeded reproducibility independent of the batch, truncation sets, penalties,
sampling frequencies, logprobs and min_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from frugal.request import Request
from frugal.sample.metadata import SamplingMetadata, make_generator
from frugal.sample.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p
from frugal.sampling_params import SamplingParams

V = 8
sampler = Sampler()


def _md(params, prompts=None, outputs=None, generators=None, eos=None):
    n = len(params)
    return SamplingMetadata.build(
        params, prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)],
        generators=generators, eos_token_ids=eos,
    )


def _peaked_logits() -> torch.Tensor:
    # probs ~ [0.50, 0.25, 0.125, 0.0625, ...] (halving): easy to reason about truncation sets.
    return torch.tensor([[-(i * math.log(2)) for i in range(V)]], dtype=torch.float32)


def _support(logits: torch.Tensor, params: SamplingParams, draws: int = 3000) -> set[int]:
    """Tokens that ever come out of `draws` samples of one row (batched as identical rows)."""
    torch.manual_seed(0)
    out = sampler(logits.expand(draws, -1).clone(), _md([params] * draws))
    return set(out.token_ids)


def test_all_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    md = _md([SamplingParams(temperature=0.0)] * 5)
    assert md.all_greedy and md.no_penalties and md.no_top_k and md.no_top_p and md.no_min_p
    assert sampler(logits, md).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5, top_k=5) for i in range(6)]
    out = sampler(logits, _md(params))
    for i in range(1, 6, 2):
        assert out.token_ids[i] == int(logits[i].argmax())


def test_seeded_rows_reproducible_and_independent_of_batch():
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randn(4, 32, generator=gen) for _ in range(10)]
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(rows_before: int, batch_seed: int) -> list[int]:
        generator = make_generator(1234)  # created once per request, kept across steps
        torch.manual_seed(batch_seed)     # unseeded neighbours draw from the global RNG
        tokens = []
        for logits in steps:
            batch = torch.cat([torch.randn(rows_before, 32), logits[:1], torch.randn(2, 32)])
            params = [SamplingParams(temperature=0.8)] * rows_before + [seeded] + [SamplingParams()] * 2
            generators = [None] * rows_before + [generator] + [None, None]
            tokens.append(sampler(batch, _md(params, generators=generators)).token_ids[rows_before])
        return tokens

    alone = run(0, 0)
    assert run(0, 99) == alone
    assert run(3, 7) == alone
    assert run(1, 5) == alone
    assert len(set(alone)) > 1  # it really samples


def test_top_k_support():
    assert _support(_peaked_logits(), SamplingParams(top_k=3)) == {0, 1, 2}
    assert _support(_peaked_logits(), SamplingParams(top_k=1)) == {0}


def test_top_p_support():
    # cumulative: 0.502, 0.753, 0.878, 0.941, ...: p=0.7 needs the first two tokens, p=0.8 three.
    assert _support(_peaked_logits(), SamplingParams(top_p=0.7)) == {0, 1}
    assert _support(_peaked_logits(), SamplingParams(top_p=0.8)) == {0, 1, 2}
    assert _support(_peaked_logits(), SamplingParams(top_p=0.3)) == {0}


def test_min_p_support():
    # p_i / p_max = 2^-i: min_p = 0.2 keeps ratios 1, 0.5, 0.25.
    assert _support(_peaked_logits(), SamplingParams(min_p=0.2)) == {0, 1, 2}
    assert _support(_peaked_logits(), SamplingParams(min_p=0.6)) == {0}


def test_no_truncation_can_sample_everything():
    assert _support(torch.zeros(1, V), SamplingParams(), draws=400) == set(range(V))


def test_truncation_masks_per_row():
    logits = _peaked_logits().expand(3, -1).clone()
    masked = apply_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.8, 1.0]))
    kept = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in masked]
    assert kept == [{0, 1}, {0, 1, 2}, set(range(V))]
    masked = apply_min_p(logits, torch.tensor([0.0, 0.2, 1.0]))
    kept = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in masked]
    assert kept == [set(range(V)), {0, 1, 2}, {0}]


def test_top_k_keeps_ties_at_kth_value():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert torch.isfinite(masked).tolist() == [[True, True, True, False]]


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    md = _md([params], prompts=[[0, 1]], outputs=[[2, 3, 3, 2, 2]])
    out = apply_penalties(logits, md)
    # repetition: seen tokens {0,1,2,3}: positive / 2, negative * 2
    # frequency: counts in output: token 2 x3, token 3 x2; presence: tokens 2 and 3
    expected = torch.tensor([[1.0, -4.0, 0.5 - 1.5 - 0.25, -2.0 - 1.0 - 0.25, 0.5, 3.0]])
    torch.testing.assert_close(out, expected)


def test_penalties_per_row_and_prompt_only_for_repetition():
    logits = torch.ones(2, 4)
    params = [SamplingParams(repetition_penalty=4.0), SamplingParams(presence_penalty=1.0)]
    md = _md(params, prompts=[[1], [1]], outputs=[[], [2]])
    out = apply_penalties(logits, md)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.25, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))


def test_repetition_penalty_steers_greedy():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    md = _md([SamplingParams(temperature=0.0, repetition_penalty=2.0)], prompts=[[0]])
    assert sampler(logits, md).token_ids == [1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_frequencies_match_softmax(temperature):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0]])
    draws = 4000
    torch.manual_seed(1234)
    out = sampler(logits.expand(draws, -1).clone(), _md([SamplingParams(temperature=temperature)] * draws))
    observed = torch.bincount(torch.tensor(out.token_ids), minlength=V).double()
    expected = torch.softmax(logits[0].double() / temperature, -1) * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, (chi2, observed.tolist(), expected.tolist())  # df = 7, p = 0.001


def test_seeded_generator_frequencies_match_softmax():
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    generator = make_generator(7)
    md = _md([SamplingParams(seed=7)], generators=[generator])
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(1500):
        counts[sampler(logits, md).token_ids[0]] += 1
    expected = torch.softmax(logits[0].double(), -1) * 1500
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # df = 3, p = 0.001


def test_logprobs_from_raw_logits():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.7, logprobs=0, top_k=4), SamplingParams(temperature=0.0)]
    md = _md(params, prompts=[[int(logits[0].argmax())], [], []])
    out = sampler(logits, md)
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for row in range(2):
        sampled_lp, rank, top = out.logprobs[row]
        token = out.token_ids[row]
        assert sampled_lp == pytest.approx(float(reference[row, token]), abs=1e-6)
        assert rank == int((reference[row] > reference[row, token]).sum()) + 1
        k = params[row].logprobs
        best = torch.topk(reference[row], k)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(best.values.tolist(), abs=1e-6)
    # row 0: the repetition penalty moved greedy off the raw argmax, so the rank is > 1
    assert out.logprobs[0][1] > 1


def test_no_logprobs_requested():
    out = sampler(torch.randn(2, 10), _md([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.logprobs is None


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]] * 3)
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,)),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,)),
              SamplingParams(temperature=0.0)]
    md = _md(params, outputs=[[4], [4, 4], [4]], eos=[{2}, {2}, {2}])
    assert sampler(logits, md).token_ids == [4, 2, 2]


def test_from_requests_uses_request_generators():
    params = SamplingParams(temperature=1.0, seed=11)
    requests = [Request(f"r{i}", [1, 2, 3], params, eos_token_ids=frozenset({2})) for i in range(2)]
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    md = SamplingMetadata.from_requests(requests, {r.request_id: make_generator(11) for r in requests})
    a, b = sampler(logits[[0, 0]], md).token_ids
    assert a == b  # same seed, same logits, separate generators
