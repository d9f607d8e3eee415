"""BlockPool / FreeBlockQueue: exact traces of LRU order, ref counts, touch and hash eviction."""

from __future__ import annotations

import pytest

from frugal.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue]


def test_free_queue_popleft_append_remove_middle():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert [b.block_id for b in queue] == [0, 1, 2, 3, 4] and len(queue) == 5
    queue.remove(blocks[2])
    queue.remove(blocks[4])  # tail
    assert [b.block_id for b in queue] == [0, 1, 3]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    assert queue.popleft() is blocks[0]
    queue.append(blocks[4])
    queue.append(blocks[0])
    assert [b.block_id for b in queue] == [1, 3, 4, 0] and len(queue) == 4
    with pytest.raises(AssertionError):
        queue.append(blocks[1])  # already queued
    for expected in (1, 3, 4, 0):
        assert queue.popleft().block_id == expected
    assert len(queue) == 0
    with pytest.raises(AssertionError):
        queue.popleft()


def test_get_new_blocks_pops_lru_and_free_appends_in_given_order():
    pool = BlockPool(6, enable_caching=True)
    assert free_ids(pool) == [0, 1, 2, 3, 4, 5] and pool.num_free_blocks == 6 and pool.usage == 0.0
    first = pool.get_new_blocks(3)
    assert [b.block_id for b in first] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in first)
    assert free_ids(pool) == [3, 4, 5] and pool.num_used_blocks == 3 and pool.usage == 0.5
    pool.free_blocks(reversed(first))  # a request's table, tail first
    assert free_ids(pool) == [3, 4, 5, 2, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(5)] == [3, 4, 5, 2, 1]
    assert free_ids(pool) == [0]
    with pytest.raises(AssertionError):
        pool.get_new_blocks(2)


def test_ref_counts_and_touch_removes_from_free_queue():
    pool = BlockPool(4, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.touch([b0])  # a second request shares b0
    assert b0.ref_cnt == 2
    pool.free_blocks([b0])
    assert b0.ref_cnt == 1 and free_ids(pool) == [2, 3]  # still held by one
    pool.free_blocks([b1, b0])
    assert free_ids(pool) == [2, 3, 1, 0]
    pool.touch([b1])  # revive from the middle of the free queue
    assert b1.ref_cnt == 1 and free_ids(pool) == [2, 3, 0]
    pool.free_blocks([b1])
    assert free_ids(pool) == [2, 3, 0, 1]
    with pytest.raises(AssertionError):
        pool.free_blocks([b1])  # double free


def test_cached_block_survives_free_until_reused_then_hash_evicted():
    pool = BlockPool(3, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_full_block(b0, 111)
    pool.cache_full_block(b1, 222)
    pool.free_blocks([b1, b0])
    assert pool.get_cached_block(111) is b0 and pool.get_cached_block(222) is b1
    assert pool.num_free_blocks == 3  # cached blocks with ref_cnt 0 count as free
    (b2,) = pool.get_new_blocks(1)
    assert b2.block_id == 2 and pool.get_cached_block(111) is b0  # the never-cached block goes first
    (reused,) = pool.get_new_blocks(1)
    assert reused is b1 and reused.block_hash is None and pool.get_cached_block(222) is None
    assert pool.get_cached_block(111) is b0 and b0.block_hash == 111


def test_cache_full_block_keeps_first_block_for_a_hash_and_ignores_recaching():
    pool = BlockPool(3, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_full_block(b0, 7)
    pool.cache_full_block(b1, 7)  # same content computed twice: the first stays
    pool.cache_full_block(b0, 8)  # already registered: unchanged
    assert pool.get_cached_block(7) is b0 and b1.block_hash is None and pool.get_cached_block(8) is None


def test_caching_disabled_never_registers():
    pool = BlockPool(2, enable_caching=False)
    (b0,) = pool.get_new_blocks(1)
    pool.cache_full_block(b0, 5)
    assert b0.block_hash is None and pool.get_cached_block(5) is None


def test_reset_prefix_cache_forgets_hashes():
    pool = BlockPool(2, enable_caching=True)
    b0, b1 = pool.get_new_blocks(2)
    pool.cache_full_block(b0, 1)
    pool.cache_full_block(b1, 2)
    pool.free_blocks([b1])
    assert pool.reset_prefix_cache() == 2
    assert b0.block_hash is None and b1.block_hash is None and pool.get_cached_block(1) is None
    pool.free_blocks([b0])
    assert pool.num_free_blocks == 2
