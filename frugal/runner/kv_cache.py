"""KV cache tensors: one per layer, `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 = keys, 1 = values), in the model dtype.

Block ids handed out by `core/` index dimension 1 directly. On CPU the tensors come from
`torch.empty`, so pages are not touched (nor committed by the OS) until a block is first written;
attention never reads a slot that was not written for the request that reads it. On CUDA they are
zeroed once so that stray reads of padding can never produce NaN.
"""

from __future__ import annotations

import logging

import torch

from frugal.model.arch_config import ArchConfig

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers (K and V)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * element_size


def allocate_kv_caches(arch: ArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str) -> list[torch.Tensor]:
    """-> one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] per layer."""
    assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
    device = torch.device(device)
    shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
    alloc = torch.empty if device.type == "cpu" else torch.zeros
    caches = [alloc(shape, dtype=dtype, device=device) for _ in range(arch.num_hidden_layers)]
    logger.info("allocated KV cache: %d layers x %d blocks x %d tokens (%.1f MiB) on %s",
                arch.num_hidden_layers, num_blocks, block_size,
                num_blocks * kv_cache_bytes_per_block(arch, block_size, dtype) / 2**20, device)
    return caches
