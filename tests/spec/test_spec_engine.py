"""Speculative decoding inside the engine on the real stories260K: greedy output identical to plain
greedy at batch 1 and 8 for every proposer, KV blocks (target and draft) all free afterwards, spec
tokens within the step budget, sampling requests and non-speculative requests in the same batch."""

from __future__ import annotations

import json

import pytest

from frugal import LLM, SamplingParams
from frugal.errors import ConfigError
from tiny_models import make_tiny_checkpoint

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the", "One day, a little boy",
           "The sun was shining and the birds", "Sam had a big red ball", "Mom said", "There was a dog"]
MAX_TOKENS = 24


def make_llm(model, speculative=None, **kwargs) -> LLM:
    return LLM(str(model), kv_cache_memory="16MiB", max_num_seqs=8, speculative=speculative, **kwargs)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A tiny random-weight Llama with the stories tokenizer (vocab 512): a draft that is mostly wrong."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"), "llama", seed=3)


@pytest.fixture(scope="module")
def plain_greedy(stories260k):
    llm = make_llm(stories260k)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [o.outputs[0].token_ids for o in outputs]


def spec_options(stories260k, random_draft):
    return {"ngram": "ngram:n=3,k=5", "draft-self": f"draft:{stories260k},k=4",
            "draft-random": f"draft:{random_draft},k=3"}


def assert_all_blocks_free(llm: LLM) -> None:
    assert llm.engine.scheduler.num_used_blocks == 0
    proposer = llm.engine.spec.proposer
    if hasattr(proposer, "num_used_blocks"):
        assert proposer.num_used_blocks == 0


@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-random"])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_identical_to_plain_greedy(stories260k, random_draft, plain_greedy, method, batch):
    llm = make_llm(stories260k, spec_options(stories260k, random_draft)[method])
    outputs = llm.generate(PROMPTS[:batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy[:batch]
    assert_all_blocks_free(llm)
    stats = [o.metrics.spec for o in outputs]
    assert all(s is not None and s.num_target_steps >= 1 for s in stats)
    for s, output in zip(stats, outputs):
        assert s.num_generated_tokens == len(output.outputs[0].token_ids)
        assert 1.0 <= s.tokens_per_target_step <= 1 + 5
        assert all(0.0 <= rate <= 1.0 for rate in s.acceptance_by_position)
    if method == "draft-self":  # the target drafting for itself: every candidate is accepted
        assert all(s.num_accepted_tokens == s.num_proposed_tokens > 0 for s in stats)
        assert all(s.tokens_per_target_step > 2 for s in stats)


def test_spec_tokens_fit_a_small_step_budget(stories260k, plain_greedy):
    """With 8 requests and a 12-token step budget, candidate chains are cut by the scheduler."""
    llm = make_llm(stories260k, f"draft:{stories260k},k=5", max_num_batched_tokens=12)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert [o.outputs[0].token_ids for o in outputs] == plain_greedy
    assert_all_blocks_free(llm)


def test_mixed_batch_sampling_penalties_and_greedy(stories260k, plain_greedy):
    llm = make_llm(stories260k, f"draft:{stories260k},k=3")
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, seed=5),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, repetition_penalty=1.3, seed=6),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2)]
    outputs = llm.generate(PROMPTS[:4], params)
    assert outputs[0].outputs[0].token_ids == plain_greedy[0]
    assert outputs[3].outputs[0].token_ids == plain_greedy[3]
    assert len(outputs[3].outputs[0].logprobs) == len(plain_greedy[3])
    assert outputs[1].metrics.spec.num_proposed_tokens > 0          # sampled with speculation
    assert outputs[2].metrics.spec.num_proposed_tokens == 0         # penalties: no speculation
    assert outputs[3].metrics.spec.num_proposed_tokens == 0         # logprobs: no speculation
    for output, p in zip(outputs, params):
        assert 1 <= len(output.outputs[0].token_ids) <= p.max_tokens
    assert_all_blocks_free(llm)


def test_stop_tokens_and_max_tokens_inside_accepted_chains(stories260k, plain_greedy):
    llm = make_llm(stories260k, f"draft:{stories260k},k=5")
    stop_token = plain_greedy[0][6]
    outputs = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[stop_token]),
                                         SamplingParams(max_tokens=7, temperature=0)])
    first = plain_greedy[0]
    assert outputs[0].outputs[0].token_ids == first[: first.index(stop_token) + 1]
    assert outputs[1].outputs[0].token_ids == plain_greedy[1][:7]
    assert_all_blocks_free(llm)


def test_low_acceptance_switches_speculation_off(stories260k, random_draft):
    llm = make_llm(stories260k, f"draft:{random_draft},k=4")
    output = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=48, temperature=0))[0]
    stats = output.metrics.spec
    # The random draft is almost never right: most target steps end up without candidates.
    assert stats.num_verify_steps < stats.num_target_steps / 2
    assert stats.num_proposed_tokens < 4 * stats.num_target_steps / 2


@pytest.mark.parametrize("bad, message", [("tree", "needs a draft model"), ("medusa:/x", "no Medusa heads"),
                                          ("beam", "unknown speculative method"), ("ngram:k=0", "positive"),
                                          ("ngram:q=3", "unknown option"), ("draft", "needs a draft model")])
def test_bad_speculative_option_is_a_clear_error(stories260k, bad, message):
    with pytest.raises(ConfigError, match=message):
        make_llm(stories260k, bad)


def test_draft_with_another_vocabulary_is_rejected(stories260k, tmp_path):
    draft = make_tiny_checkpoint(tmp_path / "d", "llama")
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": 600}))
    with pytest.raises(ConfigError, match="vocabulary"):
        make_llm(stories260k, f"draft:{draft}")


def test_seeded_sampling_with_a_draft_is_reproducible(stories260k):
    """Same seed, same batch: same tokens (draft draws come from the request's own seeded generator).
    Batch-independence is not promised: another batch shape can change the logits' last bits."""
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=11),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=12)]
    runs = [make_llm(stories260k, f"draft:{stories260k},k=3").generate(PROMPTS[:2], params) for _ in range(2)]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]
    assert runs[0][0].metrics.spec.num_accepted_tokens > 0
