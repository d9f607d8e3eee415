"""Continuous batching: batch invariance under preemption, prefix caching, seeded sampling."""

from __future__ import annotations

import random

import pytest

from frugal import LLM, SamplingParams

BLOCK_BYTES_STORIES = 2 * 5 * 16 * 4 * 8 * 4  # K+V, 5 layers, 16 tokens, 4 KV heads, head_dim 8, fp32


@pytest.fixture(scope="module")
def small_pool_llm(stories260k):
    # 64 blocks = 1024 tokens for ~3.5k tokens of concurrent demand: preemption must happen.
    return LLM(str(stories260k), dtype="float32", kv_cache_memory=64 * BLOCK_BYTES_STORIES,
               max_num_batched_tokens=256)


def test_batch_invariance_under_preemption(small_pool_llm):
    llm = small_pool_llm
    rng = random.Random(0)
    lengths = [1, 2, 7, 16, 17, 31, 33, 64, 100, 150, 200, 250, 300, 333, 380, 400]
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    preemptions_before = llm.engine.scheduler.num_preemptions
    together = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > preemptions_before, "budget too large to force preemption"
    for prompt, expected, got in zip(prompts, alone, together):
        assert got.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens diverged in the batch"
    assert llm.engine.scheduler.num_used_blocks == 0


def test_seeded_sampling_is_independent_of_batch(small_pool_llm):
    llm = small_pool_llm
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([[1, 50, 60]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, seed=7)
    together = llm.generate([[1, 9, 9, 9], [1, 50, 60], [1, 400]], [others, params, others])
    assert together[1].outputs[0].token_ids == alone
    again = llm.generate([[1, 50, 60]], params)[0].outputs[0].token_ids
    assert again == alone


def test_prefix_caching_computes_only_the_suffix(stories260k):
    llm = LLM(str(stories260k), kv_cache_memory="8MiB")
    rng = random.Random(1)
    prefix = [1] + [rng.randrange(3, 512) for _ in range(99)]  # 100 tokens: 6 full blocks
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first = llm.generate([prefix + [10, 11, 12]], params)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([prefix + [20, 21, 22, 23]], params)[0]
    assert second.num_cached_tokens == 96
    assert second.metrics.num_cached_tokens == 96
    fresh = LLM(str(stories260k), kv_cache_memory="8MiB", enable_prefix_caching=False)
    expected = fresh.generate([prefix + [20, 21, 22, 23]], params)[0]
    assert expected.num_cached_tokens == 0
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids


def test_n_samples_share_the_prompt(stories260k):
    llm = LLM(str(stories260k), kv_cache_memory="8MiB")
    output = llm.generate([[1, 30, 40]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    assert llm.engine.scheduler.num_used_blocks == 0
