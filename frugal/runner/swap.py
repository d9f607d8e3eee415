"""KVSwapper: copies KV blocks between the engine's KV pool tensors and a slower tier.

The tensor side of FastServe's proactive KV swapping (bookkeeping: `core/swap.py`). The slow tier
has one tensor per layer shaped like the KV cache, `[2, num_slow_blocks, block_size, num_kv_heads,
head_dim]`, outside the engine's KV budget:
- CUDA engine: pinned host memory (copies run on a side stream);
- CPU engine: host RAM, or with `path` (a directory) a memory-mapped file there (`torch.from_file`,
  unlinked at once so it disappears with the process).

Per step (`apply`, called by the runner before the forward pass), in `SchedulerOutput`'s order:
wait for the previous step's prefetches, copy this step's swap-outs (their fast blocks may be reused
in this step), copy its swap-ins (their requests may run in this step), then start its prefetches,
which run while this step computes (their requests are not scheduled in it). Overlap: a side CUDA
stream on GPU; on CPU a worker thread when `overlap=True` (torch's copies release the GIL).

Always true: after `wait()` every copy handed to `apply` has landed; a copy never reads a block that
the same `apply` call, or one still in flight, writes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from frugal.core.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


class KVSwapper:
    def __init__(self, kv_caches: list[torch.Tensor], num_slow_blocks: int, path: str | None = None,
                 overlap: bool = True):
        assert num_slow_blocks >= 0, num_slow_blocks
        self.kv_caches = kv_caches
        self.num_slow_blocks = num_slow_blocks
        self.device = kv_caches[0].device if kv_caches else torch.device("cpu")
        self.is_cuda = self.device.type == "cuda"
        self.overlap = overlap
        self.path: str | None = None
        self.slow_caches = self._allocate_slow_tier(path) if num_slow_blocks else []
        self._stream = torch.cuda.Stream(self.device) if (self.is_cuda and num_slow_blocks) else None
        self._event: torch.cuda.Event | None = None
        self._staged: list[torch.Tensor] = []   # pinned buffers alive until their copy lands
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-swap") if (
            num_slow_blocks and overlap and not self.is_cuda) else None
        self._future: Future | None = None
        self.num_blocks_out = 0
        self.num_blocks_in = 0

    @property
    def bytes_per_block(self) -> int:
        return sum(cache[:, 0].numel() * cache.element_size() for cache in self.kv_caches)

    def _allocate_slow_tier(self, path: str | None) -> list[torch.Tensor]:
        shapes = [(cache.shape[0], self.num_slow_blocks, *cache.shape[2:]) for cache in self.kv_caches]
        dtype = self.kv_caches[0].dtype
        if path is not None and not self.is_cuda:
            os.makedirs(path, exist_ok=True)
            handle, file_path = tempfile.mkstemp(prefix="frugal-kv-swap-", suffix=".bin", dir=path)
            os.close(handle)
            numel = sum(int(torch.Size(shape).numel()) for shape in shapes)
            flat = torch.from_file(file_path, shared=True, size=numel, dtype=dtype)  # memory-mapped
            os.unlink(file_path)  # the mapping stays valid; the space is returned when it closes
            self.path = file_path
            caches, offset = [], 0
            for shape in shapes:
                numel = int(torch.Size(shape).numel())
                caches.append(flat[offset:offset + numel].view(shape))
                offset += numel
            logger.info("KV swap tier: %d blocks (%.1f MiB) memory-mapped from %s", self.num_slow_blocks,
                        self.num_slow_blocks * self.bytes_per_block / 2**20, file_path)
            return caches
        pin = self.is_cuda
        caches = [torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin) for shape in shapes]
        logger.info("KV swap tier: %d blocks (%.1f MiB) of %shost memory", self.num_slow_blocks,
                    self.num_slow_blocks * self.bytes_per_block / 2**20, "pinned " if pin else "")
        return caches

    # ---- the step hook -----------------------------------------------------------------------

    def apply(self, output: SchedulerOutput) -> None:
        """Run one step's swaps (see the module docstring). Call before the step's forward pass."""
        self.wait()
        if output.swap_out_blocks:
            self.copy_out(output.swap_out_blocks)
        if output.swap_in_blocks:
            self.start_copy_in(output.swap_in_blocks)
            self.wait()  # their requests may run in this step
        if output.prefetch_blocks:
            self.start_copy_in(output.prefetch_blocks)

    def wait(self) -> None:
        """Block (the host on CPU, the compute stream on CUDA) until started swap-ins have landed."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None
            self._staged.clear()

    # ---- copies ------------------------------------------------------------------------------

    def copy_out(self, pairs: list[tuple[int, int]]) -> None:
        """fast block -> slow block, for every (fast id, slow id); synchronous."""
        assert self.slow_caches, "swap-out with no swap space"
        fast_ids = torch.tensor([fast for fast, _ in pairs], dtype=torch.int64)
        slow_ids = torch.tensor([slow for _, slow in pairs], dtype=torch.int64)
        fast_ids_dev = fast_ids.to(self.device)
        for fast_cache, slow_cache in zip(self.kv_caches, self.slow_caches):
            blocks = fast_cache.index_select(1, fast_ids_dev)  # [2, n, block_size, kv_heads, head_dim]
            slow_cache.index_copy_(1, slow_ids, blocks.to("cpu"))
        self.num_blocks_out += len(pairs)

    def start_copy_in(self, pairs: list[tuple[int, int]]) -> None:
        """slow block -> fast block, for every (slow id, fast id); lands by the next `wait()`."""
        assert self.slow_caches, "swap-in with no swap space"
        slow_ids = torch.tensor([slow for slow, _ in pairs], dtype=torch.int64)
        fast_ids = torch.tensor([fast for _, fast in pairs], dtype=torch.int64)
        self.num_blocks_in += len(pairs)
        if self.is_cuda:
            self._copy_in_cuda(slow_ids, fast_ids)
        elif self._executor is not None:
            self._future = self._executor.submit(self._copy_in_host, slow_ids, fast_ids)
        else:
            self._copy_in_host(slow_ids, fast_ids)

    def _copy_in_host(self, slow_ids: torch.Tensor, fast_ids: torch.Tensor) -> None:
        for fast_cache, slow_cache in zip(self.kv_caches, self.slow_caches):
            fast_cache.index_copy_(1, fast_ids, slow_cache.index_select(1, slow_ids))

    def _copy_in_cuda(self, slow_ids: torch.Tensor, fast_ids: torch.Tensor) -> None:
        stream = self._stream
        assert stream is not None
        stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier writes to these blocks
        fast_ids_dev = fast_ids.to(self.device)
        with torch.cuda.stream(stream):
            for fast_cache, slow_cache in zip(self.kv_caches, self.slow_caches):
                staged = torch.empty((slow_cache.shape[0], len(slow_ids), *slow_cache.shape[2:]),
                                     dtype=slow_cache.dtype, pin_memory=True)
                torch.index_select(slow_cache, 1, slow_ids, out=staged)
                self._staged.append(staged)
                fast_cache.index_copy_(1, fast_ids_dev, staged.to(self.device, non_blocking=True))
            self._event = torch.cuda.Event()
            self._event.record(stream)

    # ---- measurement -------------------------------------------------------------------------

    def measure_bandwidth(self, num_blocks: int = 64, repeats: int = 3) -> float:
        """Bytes per second of a swap-out plus swap-in round trip (median of `repeats`), over the
        first `num_blocks` blocks of both tiers: the fast blocks are copied out and straight back,
        so call it only while no copy is in flight (it leaves the fast blocks' contents as they
        were)."""
        assert self.slow_caches, "no swap space to measure"
        self.wait()
        num_blocks = max(1, min(num_blocks, self.num_slow_blocks, self.kv_caches[0].shape[1]))
        pairs = [(block, block) for block in range(num_blocks)]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.copy_out(pairs)
            self.start_copy_in(pairs)
            self.wait()
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        self.num_blocks_out -= num_blocks * repeats
        self.num_blocks_in -= num_blocks * repeats
        seconds = sorted(times)[len(times) // 2]
        return 2 * num_blocks * self.bytes_per_block / max(seconds, 1e-9)

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
