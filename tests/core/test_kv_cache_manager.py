"""KVCacheManager: exact block tables, prefix-cache chains, all-or-nothing allocation, free order."""

from __future__ import annotations

from frugal.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from frugal.request import Request, RequestStatus
from frugal.sampling_params import SamplingParams


def make_request(request_id: str, prompt_token_ids: list[int]) -> Request:
    return Request(request_id, list(prompt_token_ids), SamplingParams(max_tokens=8))


def free_ids(manager: KVCacheManager) -> list[int]:
    return [block.block_id for block in manager.block_pool.free_block_queue]


def ref_cnts(manager: KVCacheManager) -> list[int]:
    return [block.ref_cnt for block in manager.block_pool.blocks]


def schedule(manager: KVCacheManager, request: Request, num_new_tokens: int, computed=()) -> list[int] | None:
    """Allocate, then advance num_computed_tokens as the scheduler does."""
    block_ids = manager.allocate_slots(request, num_new_tokens, computed)
    if block_ids is not None:
        request.num_computed_tokens += len(computed) * manager.block_size + num_new_tokens
    return block_ids


def test_exact_block_ids_for_a_sequence_of_requests_and_free_order():
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", range(10))
    b = make_request("b", range(100, 105))
    assert schedule(manager, a, 10) == [0, 1, 2]
    assert schedule(manager, b, 5) == [3, 4]
    a.append_output_token_ids([50])
    assert schedule(manager, a, 1) == [0, 1, 2]  # 11 tokens still fit in 3 blocks
    a.append_output_token_ids([51])
    assert schedule(manager, a, 1) == [0, 1, 2]
    a.append_output_token_ids([52])
    assert schedule(manager, a, 1) == [0, 1, 2, 5]  # token 13 opens a block
    assert manager.num_used_blocks == 6 and manager.num_free_blocks == 4 and manager.usage == 0.6
    a.status = RequestStatus.FINISHED_LENGTH
    manager.free(a)
    assert free_ids(manager) == [6, 7, 8, 9, 5, 2, 1, 0]  # tail blocks evicted before the prefix
    assert manager.get_block_ids("a") == [] and manager.get_block_ids("b") == [3, 4]
    c = make_request("c", range(200, 208))
    assert schedule(manager, c, 8) == [6, 7]
    assert manager.get_computed_blocks(c) == ([], 0)  # caching off: never a hit


def test_block_hashes_are_chained_and_incremental():
    manager = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    request = make_request("r", range(9))
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    hashes = manager.block_hashes(request)
    assert hashes == [h0, h1]
    request.append_output_token_ids([8, 9, 10])
    assert manager.block_hashes(request) is hashes  # extended in place, not recomputed
    assert hashes == [h0, h1, hash_block_tokens(h1, [8, 8, 9, 10])]


def test_prefix_hit_shares_blocks_and_a_differing_token_breaks_the_chain():
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", range(13))  # 3 full blocks + 1 token
    assert manager.get_computed_blocks(a) == ([], 0)
    assert schedule(manager, a, 13) == [0, 1, 2, 3]
    assert [manager.block_pool.blocks[i].block_hash is not None for i in range(4)] == [True, True, True, False]

    b = make_request("b", list(range(8)) + [100, 101])  # shares 2 full blocks
    computed, num_computed_tokens = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed] == [0, 1] and num_computed_tokens == 8
    assert schedule(manager, b, 2, computed) == [0, 1, 4]
    assert b.num_computed_tokens == 10
    assert ref_cnts(manager)[:5] == [2, 2, 1, 1, 1]

    prompt = list(range(13))
    prompt[5] = 55  # block 1 differs; block 2's tokens still equal a's, but the chain is broken
    c = make_request("c", prompt)
    computed, num_computed_tokens = manager.get_computed_blocks(c)
    assert [blk.block_id for blk in computed] == [0] and num_computed_tokens == 4
    assert schedule(manager, c, 9, computed) == [0, 5, 6, 7]
    assert ref_cnts(manager)[:8] == [3, 2, 1, 1, 1, 1, 1, 1]

    stats = manager.prefix_cache_stats
    assert (stats.num_queries, stats.num_query_tokens, stats.num_hit_tokens) == (3, 36, 12)
    assert abs(stats.hit_rate - 12 / 36) < 1e-12

    for request in (a, b, c):
        request.status = RequestStatus.FINISHED_STOPPED
        manager.free(request)
    assert manager.num_free_blocks == 10 and all(cnt == 0 for cnt in ref_cnts(manager))
    # a freed 3,2,1,0 -> 1 and 0 still held; b freed 4,1,0 -> 4 and 1 reach 0; c freed 7,6,5,0.
    assert free_ids(manager) == [8, 9, 3, 2, 4, 1, 7, 6, 5, 0]


def test_fully_cached_prompt_leaves_one_token_to_compute():
    manager = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = make_request("a", range(8))
    assert schedule(manager, a, 8) == [0, 1]
    b = make_request("b", range(8))  # every token cached
    computed, num_computed_tokens = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed] == [0] and num_computed_tokens == 4
    assert schedule(manager, b, 4, computed) == [0, 2]
    assert b.num_computed_tokens == 8
    c = make_request("c", range(9))  # one token past the cached blocks: both blocks hit
    computed, num_computed_tokens = manager.get_computed_blocks(c)
    assert [blk.block_id for blk in computed] == [0, 1] and num_computed_tokens == 8


def test_hits_on_freed_blocks_revive_them_and_evict_lru_others():
    manager = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    a = make_request("a", range(8))
    assert schedule(manager, a, 8) == [0, 1]
    a.status = RequestStatus.FINISHED_STOPPED
    manager.free(a)
    assert free_ids(manager) == [2, 1, 0]
    b = make_request("b", list(range(4)) + list(range(50, 58)))
    computed, _ = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed] == [0]
    assert schedule(manager, b, 8, computed) == [0, 2, 1]  # block 1 (a's tail) evicted for b
    assert manager.block_pool.get_cached_block(hash_block_tokens(None, [0, 1, 2, 3])) is not None
    assert manager.num_free_blocks == 0


def test_allocate_failure_has_no_side_effects():
    manager = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    a = make_request("a", range(8))
    assert schedule(manager, a, 8) == [0, 1]
    a.status = RequestStatus.FINISHED_STOPPED
    manager.free(a)
    other = make_request("other", range(70, 74))
    assert schedule(manager, other, 4) == [2]
    assert free_ids(manager) == [1, 0]

    b = make_request("b", list(range(4)) + list(range(50, 58)))  # hit on block 0, needs 2 more
    computed, _ = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed] == [0]
    # 2 blocks free, but one of them is the hit being revived: only 1 available for new blocks.
    before = (free_ids(manager), ref_cnts(manager), dict(manager.block_pool.cached_block_hash_to_block))
    assert manager.allocate_slots(b, 8, computed) is None
    after = (free_ids(manager), ref_cnts(manager), dict(manager.block_pool.cached_block_hash_to_block))
    assert before == after and manager.get_block_ids("b") == [] and b.num_computed_tokens == 0
    assert manager.prefix_cache_stats.num_queries == 2  # a and other; the failed admission is not counted

    big = make_request("big", range(100, 112))
    assert manager.allocate_slots(big, 12) is None and free_ids(manager) == [1, 0]


def test_speculative_positions_are_never_cached():
    manager = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    request = make_request("r", range(6))
    assert schedule(manager, request, 6) == [0, 1]
    request.append_output_token_ids([6])  # 7 known tokens; positions 7, 8 are speculative
    assert manager.allocate_slots(request, 3) == [0, 1, 2]
    blocks = manager.block_pool.blocks
    assert blocks[0].block_hash is not None and blocks[1].block_hash is None  # block 1 holds spec pos 7
    request.num_computed_tokens += 3
    # One spec token accepted plus a bonus token: 9 known, roll back the rejected position.
    request.append_output_token_ids([7, 8])
    request.num_computed_tokens -= 2 + 1 - 2
    assert manager.allocate_slots(request, 1) == [0, 1, 2]
    assert blocks[1].block_hash == manager.block_hashes(request)[1]


def test_preempted_request_keeps_hashes_finished_drops_them():
    manager = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    request = make_request("r", range(8))
    schedule(manager, request, 8)
    hashes = manager.block_hashes(request)
    request.status = RequestStatus.PREEMPTED
    request.num_computed_tokens = 0
    manager.free(request)
    assert manager.block_hashes(request) is hashes
    computed, num_computed_tokens = manager.get_computed_blocks(request)
    assert num_computed_tokens == 4  # its own blocks are still cached
    request.status = RequestStatus.FINISHED_ABORTED
    manager.free(request)
    assert "r" not in manager._request_block_hashes
    assert manager.num_free_blocks == 4
