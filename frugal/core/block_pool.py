"""BlockPool: every KV cache block, its reference count, the LRU free queue and the prefix-cache map.

The paged KV cache (vLLM, "Efficient Memory Management for LLM Serving with PagedAttention") splits
each request's keys/values into fixed-size blocks that live anywhere in one preallocated pool. This
module only does the bookkeeping; the tensors live in the runner.

Always true:
- `ref_cnt` of a block is the number of requests whose block table holds it.
- A block is in the free queue exactly when `ref_cnt == 0`. Free blocks may still carry a
  `block_hash` (their contents are a reusable cached prefix) until they are handed out again:
  `get_new_blocks` evicts in LRU order (queue head first), `touch` revives a cached hit.
- `block_hash is not None` exactly when the hash -> block map points at this block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)


class KVCacheBlock:
    """One block of `block_size` KV slots. The free-queue pointers are owned by `FreeBlockQueue`."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed first; O(1) popleft/append/remove.

    Two sentinels bracket the list, so every real block in the queue has both neighbours set and a
    block outside the queue has both pointers None.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()):
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "free block queue is empty"
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} is already queued"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        assert prev_block is not None and next_block is not None, f"{block} is not in the free queue"
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """All `num_blocks` blocks. With `enable_caching` full blocks can be registered under their
    chained hash and found again by later requests (automatic prefix caching)."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        assert num_blocks > 0, f"num_blocks must be positive, got {num_blocks}"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached-but-evictable ones included."""
        return self.free_block_queue.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request (0.0 .. 1.0)."""
        return self.num_used_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the free-queue head (LRU first), evicting their cached hashes."""
        assert num_blocks <= self.num_free_blocks, \
            f"asked for {num_blocks} blocks with only {self.num_free_blocks} free"
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0, block
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free-queue tail in the
        order given (callers pass a request's table reversed so its prefix is evicted last)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"freeing {block} twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one reference on each (cache-hit) block, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Register a full block under `block_hash`. A block already registered, or a hash already
        held by another block (the same content computed twice), is left as it is."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_block_hash_to_block:
            return
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (blocks in use keep their contents but can no longer be hit).
        Returns the number of hashes dropped."""
        num_dropped = len(self.cached_block_hash_to_block)
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        logger.debug("prefix cache reset: %d cached blocks forgotten", num_dropped)
        return num_dropped

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        cached = self.cached_block_hash_to_block.pop(block.block_hash, None)
        assert cached is block, f"hash map out of sync for {block}"
        block.block_hash = None
