"""KVSwapper (the tensor side of swapping) and swapping on the real engine with stories260K: a
request swapped out and back in produces exactly the tokens it produces when never preempted."""

from __future__ import annotations

import random

import pytest
import torch

from frugal import LLM, SamplingParams
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.scheduler_output import SchedulerOutput
from frugal.runner.swap import KVSwapper

# 2 layers of [2, num_blocks, block_size, kv_heads, head_dim]
SHAPE = (2, 8, 4, 2, 3)


def make_caches(device="cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=generator).to(device) for _ in range(2)]


def swaps(out=(), swap_in=(), prefetch=()) -> SchedulerOutput:
    return SchedulerOutput(scheduled=[], num_scheduled_tokens=0, swap_out_blocks=list(out),
                           swap_in_blocks=list(swap_in), prefetch_blocks=list(prefetch))


@pytest.mark.parametrize("tier", ["host", "mmap"])
@pytest.mark.parametrize("overlap", [False, True])
def test_blocks_round_trip_through_the_slow_tier(tmp_path, tier, overlap):
    caches = make_caches()
    original = [cache.clone() for cache in caches]
    swapper = KVSwapper(caches, num_slow_blocks=5, path=str(tmp_path) if tier == "mmap" else None, overlap=overlap)
    assert swapper.bytes_per_block == 2 * 2 * 4 * 2 * 3 * 4  # layers * K/V * tokens * heads * dim * fp32
    if tier == "mmap":
        assert swapper.path is not None and swapper.path.startswith(str(tmp_path))
        assert not list(tmp_path.iterdir())  # unlinked at once: nothing left behind
    swapper.apply(swaps(out=[(1, 0), (6, 3), (2, 4)]))
    for cache in caches:
        cache[:, [1, 6, 2]] = 0.0  # the fast blocks are reused by someone else
    # Swap 1 and 6 back in now (into 5 and 7), prefetch 2 (into 0): it lands by the next apply/wait.
    swapper.apply(swaps(swap_in=[(0, 5), (3, 7)], prefetch=[(4, 0)]))
    for cache, before in zip(caches, original):
        torch.testing.assert_close(cache[:, 5], before[:, 1], rtol=0, atol=0)
        torch.testing.assert_close(cache[:, 7], before[:, 6], rtol=0, atol=0)
    swapper.apply(swaps())
    for cache, before in zip(caches, original):
        torch.testing.assert_close(cache[:, 0], before[:, 2], rtol=0, atol=0)
        torch.testing.assert_close(cache[:, 3], before[:, 3], rtol=0, atol=0)  # untouched block
    assert (swapper.num_blocks_out, swapper.num_blocks_in) == (3, 3)
    swapper.close()


def test_bandwidth_measurement_leaves_the_kv_cache_unchanged():
    caches = make_caches()
    original = [cache.clone() for cache in caches]
    swapper = KVSwapper(caches, num_slow_blocks=6)
    assert swapper.measure_bandwidth(num_blocks=4, repeats=2) > 0
    for cache, before in zip(caches, original):
        torch.testing.assert_close(cache, before, rtol=0, atol=0)
    assert (swapper.num_blocks_out, swapper.num_blocks_in) == (0, 0)


def test_no_swap_space_means_no_swapping():
    swapper = KVSwapper(make_caches(), 0)
    swapper.apply(swaps())  # nothing to do
    with pytest.raises(AssertionError, match="no swap space"):
        swapper.apply(swaps(out=[(0, 0)]))


@pytest.mark.gpu
def test_pinned_host_tier_round_trip_on_cuda():
    caches = make_caches("cuda")
    original = [cache.clone() for cache in caches]
    swapper = KVSwapper(caches, num_slow_blocks=4)
    assert all(slow.is_pinned() for slow in swapper.slow_caches)
    swapper.apply(swaps(out=[(1, 0), (2, 1)]))
    for cache in caches:
        cache[:, [1, 2]] = 0.0
    swapper.apply(swaps(swap_in=[(0, 4)], prefetch=[(1, 5)]))
    swapper.apply(swaps())
    torch.cuda.synchronize()
    for cache, before in zip(caches, original):
        torch.testing.assert_close(cache[:, 4], before[:, 1], rtol=0, atol=0)
        torch.testing.assert_close(cache[:, 5], before[:, 2], rtol=0, atol=0)


# ---- the real engine -------------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    """On a shared 2-core machine two intra-op threads spin against other work; one is faster here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROFILE = PrefillProfile(((1, 0.002), (64, 0.004), (256, 0.02), (511, 0.05)))  # no startup measurement


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(8, 90))] for _ in range(count)]


def assert_no_block_held(llm: LLM) -> None:
    scheduler = llm.engine.scheduler
    kv = scheduler.kv_cache_manager
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks and all(block.ref_cnt == 0 for block in kv.block_pool.blocks)
    assert not scheduler.swap.owners()
    assert scheduler.swap.pool.num_free_blocks + scheduler.swap.pool.num_released_blocks == scheduler.swap.pool.num_blocks


@pytest.mark.parametrize("policy, tier, caching", [
    ("skip-join-mlfq", "host", True),
    ("mlfq", "mmap", False),
    ("fcfs", "host", False),
])
def test_swapped_requests_produce_exactly_the_tokens_of_unpreempted_ones(stories260k, tmp_path, one_thread, policy,
                                                                       tier, caching):
    batch = prompts(10)
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=48, ignore_eos=True)
    reference_llm = LLM(model=str(stories260k))  # the whole batch fits: never preempted
    expected = [out.outputs[0].token_ids for out in reference_llm.generate(batch, [greedy, seeded] * 5)]
    assert reference_llm.engine.scheduler.num_preemptions == 0

    bytes_per_block = reference_llm.engine.swapper.bytes_per_block
    options = {"prefill_profile": PROFILE}
    if policy == "mlfq":
        options["quantum_s"] = 0.001
    llm = LLM(model=str(stories260k), kv_cache_memory=24 * bytes_per_block, max_num_seqs=4,
              scheduling_policy=policy, policy_options=options if policy != "fcfs" else None,
              swap_space=64 * bytes_per_block, swap_path=str(tmp_path) if tier == "mmap" else None,
              enable_prefix_caching=caching)
    assert llm.engine.num_blocks == 24 and llm.engine.swapper.num_slow_blocks == 64
    outputs = llm.generate(batch, [greedy, seeded] * 5)
    scheduler = llm.engine.scheduler
    assert scheduler.swap.num_swap_outs > 0 and scheduler.swap.num_swap_ins == scheduler.swap.num_swap_outs
    assert llm.engine.swapper.num_blocks_out > 0 and llm.engine.swapper.num_blocks_in > 0
    assert [out.outputs[0].token_ids for out in outputs] == expected
    assert sum(out.metrics.num_preemptions for out in outputs) == scheduler.num_preemptions > 0
    assert_no_block_held(llm)
