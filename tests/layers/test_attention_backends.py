"""The SDPA backend agrees with the reference backend on random paged batches: mixed prefill chunks
and decodes, random block tables, GQA, tree masks, sliding windows; unwritten slots hold NaN."""

from __future__ import annotations

import random

import pytest
import torch

from frugal.layers.attention import Attention, write_kv_cache
from frugal.layers.attention_backends import (ReferenceAttentionBackend, SdpaAttentionBackend,
                                              get_attention_backend)
from frugal.layers.attention_metadata import AttentionMetadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 64


def make_batch(requests: list[tuple[int, int]], seed: int = 0, tree: bool = False):
    """requests: (num_computed, query_len) each. -> (query, kv_cache, metadata) with the cache holding
    random K/V for every position < seq_len of every request and NaN everywhere else."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    free_blocks = list(range(NUM_BLOCKS))
    rng.shuffle(free_blocks)
    kv_cache = torch.full((2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    tables, query_start_loc, query_lens, seq_lens, tree_masks = [], [0], [], [], []
    for num_computed, query_len in requests:
        seq_len = num_computed + query_len
        blocks = [free_blocks.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        tables.append(blocks)
        slots = torch.tensor([blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len)])
        kv = torch.randn(2, seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        write_kv_cache(kv[0], kv[1], kv_cache, slots)
        query_start_loc.append(query_start_loc[-1] + query_len)
        query_lens.append(query_len)
        seq_lens.append(seq_len)
        if tree and query_len > 1:
            mask = torch.rand(query_len, query_len, generator=gen) < 0.5
            tree_masks.append(torch.tril(mask) | torch.eye(query_len, dtype=torch.bool))
        else:
            tree_masks.append(None)
    block_tables = torch.zeros(len(requests), max(len(t) for t in tables), dtype=torch.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = torch.tensor(table)
    metadata = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=block_tables,
                                 query_start_loc=query_start_loc, query_lens=query_lens, seq_lens=seq_lens,
                                 block_size=BLOCK_SIZE, tree_masks=tree_masks if tree else None)
    query = torch.randn(query_start_loc[-1], NUM_HEADS, HEAD_DIM, generator=gen)
    return query, kv_cache, metadata


MIXED = [(0, 7), (20, 1), (33, 1), (5, 12), (17, 1), (0, 1), (9, 3)]
DECODES = [(0, 1), (3, 1), (15, 1), (40, 1), (7, 1)]


@pytest.mark.parametrize("sliding_window", [None, 1, 6, 100])
@pytest.mark.parametrize("requests,tree", [(MIXED, False), (MIXED, True), (DECODES, False)])
def test_sdpa_matches_reference(requests, tree, sliding_window):
    query, kv_cache, metadata = make_batch(requests, seed=len(requests) + tree, tree=tree)
    scale = HEAD_DIM**-0.5
    expected = ReferenceAttentionBackend().forward(query, kv_cache, metadata, scale, sliding_window)
    actual = SdpaAttentionBackend().forward(query, kv_cache, metadata, scale, sliding_window)
    assert actual.shape == (query.shape[0], NUM_HEADS * HEAD_DIM)
    assert not expected.isnan().any()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal_tree_mask_equals_no_mask(backend):
    query, kv_cache, metadata = make_batch(MIXED, seed=3)
    impl = get_attention_backend(backend)
    plain = impl.forward(query, kv_cache, metadata, 0.3)
    metadata.tree_masks = [torch.tril(torch.ones(n, n, dtype=torch.bool)) for n in metadata.query_lens]
    torch.testing.assert_close(impl.forward(query, kv_cache, metadata, 0.3), plain, atol=1e-5, rtol=1e-5)


def test_reference_single_request_is_causal_attention():
    query, kv_cache, metadata = make_batch([(0, 9)], seed=5)
    out = ReferenceAttentionBackend().forward(query, kv_cache, metadata, 0.5).view(9, NUM_HEADS, HEAD_DIM)
    table = metadata.block_tables[0, :3]
    key = kv_cache[0, table].flatten(0, 1)[:9].repeat_interleave(2, dim=1)
    value = kv_cache[1, table].flatten(0, 1)[:9].repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=0.5)
    torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_attention_layer_writes_cache_then_attends():
    query, kv_cache, metadata = make_batch([(0, 5)], seed=9)
    key = torch.randn(5, NUM_KV_HEADS * HEAD_DIM)
    value = torch.randn(5, NUM_KV_HEADS * HEAD_DIM)
    table = metadata.block_tables[0].tolist()
    metadata.slot_mapping = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(5)])
    layer = Attention(NUM_HEADS, HEAD_DIM, 0.25, NUM_KV_HEADS, get_attention_backend("sdpa"))
    layer(query.flatten(1), key, value, kv_cache, metadata)
    written = kv_cache[0, table].flatten(0, 1)[:5]
    torch.testing.assert_close(written, key.view(5, NUM_KV_HEADS, HEAD_DIM))


def test_unknown_backend():
    assert isinstance(get_attention_backend("auto"), SdpaAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")
