"""KV swapping bookkeeping: a second, slower block pool and which request's KV lives there.

FastServe keeps a preempted job's KV cache in a slower tier instead of recomputing it: GPU -> pinned
host memory on a GPU machine; on a CPU machine, the engine's KV budget -> host RAM or a
memory-mapped file outside it. This module only does the bookkeeping (block ids, no tensors); the
runner (`runner/swap.py`) copies the blocks named in `SchedulerOutput.swap_out_blocks` /
`swap_in_blocks`.

Whether a victim is swapped or recomputed is decided per job by `SwapCostModel.prefer_swap`:
moving its blocks out and back at the measured bandwidth versus prefilling its computed tokens
again (from the measured `PrefillProfile`).

Always true:
- a slow block is free, owned by exactly one swapped request, or released in this step (it becomes
  free at the next `begin_step`, so a block a swap-in reads is never a swap-out's destination in
  the same step);
- a swapped request owns no fast block and exactly `ceil(num_computed_tokens / block_size)` slow
  blocks, in position order; its `num_computed_tokens` (the KV kept) is unchanged by the swap;
- `swap_in` either succeeds completely or changes nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from frugal.core.kv_cache_manager import KVCacheManager
from frugal.core.prefill_profile import PrefillProfile
from frugal.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapCostModel:
    """Prices the two ways to preempt a job. Numbers measured on the machine (see
    `frugal.engine.profiling`): bytes per KV block over all layers, the copy bandwidth between the
    tiers, and the prefill profile (None: recompute cost unknown, swapping is preferred)."""

    bytes_per_block: int
    bandwidth_bytes_per_s: float
    prefill_profile: PrefillProfile | None = None

    def __post_init__(self) -> None:
        assert self.bytes_per_block > 0 and self.bandwidth_bytes_per_s > 0, self

    def swap_time_s(self, num_blocks: int) -> float:
        """One direction (out or in)."""
        return num_blocks * self.bytes_per_block / self.bandwidth_bytes_per_s

    def recompute_time_s(self, num_tokens: int) -> float:
        if self.prefill_profile is None:
            return float("inf")
        return self.prefill_profile.time_s(num_tokens)

    def prefer_swap(self, num_blocks: int, num_tokens: int) -> bool:
        """Swap when moving the blocks out and back in is cheaper than prefilling the tokens again."""
        return 2 * self.swap_time_s(num_blocks) < self.recompute_time_s(num_tokens)


class SlowBlockPool:
    """Ids `0 .. num_blocks - 1` of the slow tier, handed out lowest-first. Released blocks wait one
    step (`flush_released`) before they can be handed out again."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 0, num_blocks
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._released: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_released_blocks(self) -> int:
        return len(self._released)

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self._free):
            return None
        return [self._free.popleft() for _ in range(num_blocks)]

    def release(self, block_ids: list[int]) -> None:
        self._released.extend(block_ids)

    def flush_released(self) -> None:
        self._free.extend(self._released)
        self._released.clear()

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def released_block_ids(self) -> list[int]:
        return list(self._released)


class SwapManager:
    """Moves requests' KV between the KVCacheManager's pool and a SlowBlockPool (bookkeeping only)."""

    def __init__(self, num_slow_blocks: int, kv_cache_manager: KVCacheManager,
                 cost_model: SwapCostModel | None = None):
        self.kv_cache_manager = kv_cache_manager
        self.block_size = kv_cache_manager.block_size
        self.pool = SlowBlockPool(num_slow_blocks)
        self.cost_model = cost_model
        self._tables: dict[str, list[int]] = {}   # request_id -> slow block ids, position order
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_blocks_swapped_out = 0
        self.num_blocks_swapped_in = 0

    @property
    def enabled(self) -> bool:
        return self.pool.num_blocks > 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def slow_block_ids(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def owners(self) -> dict[str, list[int]]:
        return {request_id: list(table) for request_id, table in self._tables.items()}

    def begin_step(self) -> None:
        """Blocks released in the previous step become free."""
        self.pool.flush_released()

    # ---- decisions -----------------------------------------------------------------------------

    def num_blocks_to_swap_out(self, request: Request) -> int:
        """Blocks that hold the request's computed KV."""
        return -(-request.num_computed_tokens // self.block_size)

    def num_blocks_to_swap_in(self, request: Request) -> int:
        return len(self._tables.get(request.request_id, ()))

    def can_swap_out(self, request: Request) -> bool:
        num_blocks = self.num_blocks_to_swap_out(request)
        return 0 < num_blocks <= self.pool.num_free_blocks

    def prefer_swap(self, request: Request) -> bool:
        """Swap (rather than recompute) this victim: it fits in the slow tier and, with a cost model,
        moving it out and back is cheaper than recomputing it."""
        if not self.can_swap_out(request):
            return False
        if self.cost_model is None:
            return True
        return self.cost_model.prefer_swap(self.num_blocks_to_swap_out(request), request.num_computed_tokens)

    def recompute_is_cheaper(self, request: Request) -> bool:
        """The cost model prices recomputing this request's KV below moving it out and back."""
        if self.cost_model is None:
            return False
        return not self.cost_model.prefer_swap(self.num_blocks_to_swap_out(request), request.num_computed_tokens)

    def evicts_cheaply(self, request: Request) -> bool:
        """Evicting it costs what the cost model chose: a swap with room for it, or a recompute that
        is cheaper than swapping. (A recompute forced by a full or absent slow tier is not cheap.)"""
        return self.prefer_swap(request) or self.recompute_is_cheaper(request)

    # ---- moves ---------------------------------------------------------------------------------

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Give the request's computed blocks slow-tier homes and free its fast table. Returns the
        copies to make, (fast block id, slow block id), before the fast blocks are written again."""
        num_blocks = self.num_blocks_to_swap_out(request)
        slow_ids = self.pool.allocate(num_blocks)
        assert slow_ids is not None and num_blocks > 0, (request.request_id, num_blocks)
        fast_ids = self.kv_cache_manager.get_block_ids(request.request_id)[:num_blocks]
        assert len(fast_ids) == num_blocks, (request.request_id, fast_ids, num_blocks)
        self.kv_cache_manager.free(request)
        self._tables[request.request_id] = slow_ids
        self.num_swap_outs += 1
        self.num_blocks_swapped_out += num_blocks
        return list(zip(fast_ids, slow_ids))

    def swap_in(self, request: Request) -> list[tuple[int, int]] | None:
        """Give the request a fast table again (None, nothing changed, when the pool cannot). Returns
        the copies to make, (slow block id, fast block id); blocks found in the prefix cache need
        none. The slow blocks are released (free from the next step)."""
        slow_ids = self._tables.get(request.request_id)
        assert slow_ids, f"{request.request_id} is not swapped out"
        allocated = self.kv_cache_manager.allocate_swapped_in(request, len(slow_ids))
        if allocated is None:
            return None
        fast_ids, num_hit_blocks = allocated
        del self._tables[request.request_id]
        self.pool.release(slow_ids)
        self.num_swap_ins += 1
        self.num_blocks_swapped_in += len(slow_ids) - num_hit_blocks
        return list(zip(slow_ids[num_hit_blocks:], fast_ids[num_hit_blocks:]))

    def free(self, request: Request) -> None:
        """Forget a swapped request that finished or was aborted (its slow blocks are released)."""
        slow_ids = self._tables.pop(request.request_id, None)
        if slow_ids:
            self.pool.release(slow_ids)
