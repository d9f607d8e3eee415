"""KVCacheManager: each request's block table, and automatic prefix caching over the BlockPool.

Prefix caching (vLLM v1's design): the hash of full block i of a request is
`hash((hash of block i-1 or None, tuple(the block_size token ids of block i)))`, so a hash names the
whole prefix up to the end of that block. A new request reuses the longest run of cached blocks
matching its tokens and computes only the rest.

Always true:
- A request's table covers at least `num_computed_tokens` tokens; blocks appear in position order.
- Only blocks FULL of known tokens (positions < `request.num_tokens`) are hashed and cached; a block
  holding a speculative or not-yet-known position is never cached.
- A block is cached as soon as the step that computes it is scheduled, so a later entry of the SAME
  step's batch may hit it: the runner must write a layer's K/V for earlier batch entries before
  later entries attend (writing the whole batch's K/V first, then attending, satisfies this).
- `allocate_slots` either succeeds completely or changes nothing.

Hashes use Python's built-in tuple hash (64-bit, deterministic for ints); `hash_block_tokens` is the
one place to swap in a cryptographic hash if untrusted prompts must never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from frugal.core.block_pool import BlockPool, KVCacheBlock
from frugal.request import Request

logger = logging.getLogger(__name__)


def hash_block_tokens(parent_block_hash: int | None, block_token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: names the whole prefix ending with this block."""
    return hash((parent_block_hash, tuple(block_token_ids)))


@dataclass
class PrefixCacheStats:
    """Counted once per successful admission (`allocate_slots` on a request holding no blocks), so a
    lookup retried after a failed admission is not counted twice; re-admissions after preemption
    count again."""

    num_queries: int = 0          # admissions looked up in the cache
    num_query_tokens: int = 0     # tokens of the requests admitted
    num_hit_tokens: int = 0       # of which found in the cache

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        assert block_size > 0, f"block_size must be positive, got {block_size}"
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.prefix_cache_stats = PrefixCacheStats()
        # request_id -> block table, in position order.
        self._request_blocks: dict[str, list[KVCacheBlock]] = {}
        # request_id -> hashes of the request's full blocks so far (kept across preemption).
        self._request_block_hashes: dict[str, list[int]] = {}
        # request_id -> how many leading blocks of its table have been offered to the cache.
        self._num_cached_blocks: dict[str, int] = {}

    # ---- pool state --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_cnt > 0."""
        return self.block_pool.num_used_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool can hold: the longest context a request running alone can reach."""
        return self.num_blocks * self.block_size

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._request_blocks.get(request_id, ())]

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return list(self._request_blocks.get(request_id, ()))

    def reset_prefix_cache(self) -> int:
        return self.block_pool.reset_prefix_cache()

    # ---- hashing -----------------------------------------------------------------------------

    def block_hashes(self, request: Request) -> list[int]:
        """Hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self._request_block_hashes.setdefault(request.request_id, [])
        num_full_blocks = request.num_tokens // self.block_size
        token_ids = request.all_token_ids
        while len(hashes) < num_full_blocks:
            start = len(hashes) * self.block_size
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, token_ids[start:start + self.block_size]))
        return hashes

    # ---- allocation --------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks matching the request's tokens, and the tokens they hold.

        At least one token is always left to compute (its logits are needed), so a request whose
        every token is cached gets its last block dropped from the hit. Does not take references:
        pass the blocks to `allocate_slots`, before any other allocation, to keep them.
        """
        if not self.enable_prefix_caching:
            return [], 0
        assert request.num_computed_tokens == 0, \
            f"prefix lookup for {request.request_id} with {request.num_computed_tokens} computed tokens"
        hashes = self.block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        computed_blocks = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = ()) -> list[int] | None:
        """Grow the request's table to cover `num_computed_tokens + len(new_computed_blocks) *
        block_size + num_new_tokens` tokens (speculative tokens included), taking references on the
        computed (cache-hit) blocks. Returns the whole table's block ids, or None, with nothing
        changed, when the free pool (evictable cached blocks count as free, except the hits being
        taken) cannot supply the new blocks."""
        assert num_new_tokens >= 0, num_new_tokens
        request_id = request.request_id
        table = self._request_blocks.get(request_id)
        if table is None:
            table = []
        assert not new_computed_blocks or not table, \
            f"cache hits offered to {request_id}, which already holds {len(table)} blocks"
        num_total_tokens = (request.num_computed_tokens + len(new_computed_blocks) * self.block_size
                            + num_new_tokens)
        num_required_blocks = -(-num_total_tokens // self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(table) - len(new_computed_blocks))
        num_revived_blocks = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_revived_blocks:
            return None

        if self.enable_prefix_caching and not table and request.num_computed_tokens == 0:
            stats = self.prefix_cache_stats  # an admission: count its lookup once
            stats.num_queries += 1
            stats.num_query_tokens += request.num_tokens
            stats.num_hit_tokens += len(new_computed_blocks) * self.block_size
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            table.extend(new_computed_blocks)
            self._num_cached_blocks[request_id] = len(new_computed_blocks)
        if num_new_blocks:
            table.extend(self.block_pool.get_new_blocks(num_new_blocks))
        self._request_blocks[request_id] = table

        if self.enable_prefix_caching:
            self._cache_full_blocks(request, table, min(num_total_tokens, request.num_tokens))
        return [block.block_id for block in table]

    def allocate_swapped_in(self, request: Request, num_blocks: int) -> tuple[list[int], int] | None:
        """Give a swapped-out request (holding no block) a table of `num_blocks` again. Its leading
        blocks still found in the prefix cache are taken as hits (their KV is already here); the
        rest are new blocks the caller fills from the slow tier. Returns (block ids, number of hit
        blocks), or None, with nothing changed, when the free pool cannot supply the new blocks.

        The new blocks are offered to the prefix cache only at the request's next `allocate_slots`
        (a later step, once their copy has landed), never while their contents are in flight."""
        request_id = request.request_id
        assert not self._request_blocks.get(request_id), f"{request_id} already holds blocks"
        assert 0 < num_blocks and (num_blocks - 1) * self.block_size < max(request.num_computed_tokens, 1), \
            (request_id, num_blocks, request.num_computed_tokens)
        hits: list[KVCacheBlock] = []
        if self.enable_prefix_caching:
            num_full_computed = min(num_blocks, request.num_computed_tokens // self.block_size)
            for block_hash in self.block_hashes(request)[:num_full_computed]:
                block = self.block_pool.get_cached_block(block_hash)
                if block is None:
                    break
                hits.append(block)
        num_new_blocks = num_blocks - len(hits)
        num_revived_blocks = sum(1 for block in hits if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_revived_blocks:
            return None
        self.block_pool.touch(hits)
        table = hits + self.block_pool.get_new_blocks(num_new_blocks)
        self._request_blocks[request_id] = table
        self._num_cached_blocks[request_id] = len(hits)
        return [block.block_id for block in table], len(hits)

    def _cache_full_blocks(self, request: Request, table: list[KVCacheBlock], num_known_tokens: int) -> None:
        """Offer to the cache every block that is full of known tokens and not offered yet."""
        num_full_blocks = num_known_tokens // self.block_size
        num_cached = self._num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= num_cached:
            return
        hashes = self.block_hashes(request)
        for index in range(num_cached, num_full_blocks):
            self.block_pool.cache_full_block(table[index], hashes[index])
        self._num_cached_blocks[request.request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release the request's table, tail first, so its prefix blocks stay cached longest.

        A finished request's hashes are dropped too; a preempted one keeps them for re-admission.
        """
        request_id = request.request_id
        table = self._request_blocks.pop(request_id, [])
        self._num_cached_blocks.pop(request_id, None)
        self.block_pool.free_blocks(reversed(table))
        if request.is_finished:
            self._request_block_hashes.pop(request_id, None)
