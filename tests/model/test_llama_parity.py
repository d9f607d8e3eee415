"""Our Llama/Mistral/Qwen2/Mixtral (and ReGLU/GeGLU Llama) logits match transformers' full-sequence
logits (fp32) however the sequence is fed: one prefill, prefill chunks then decodes, or batched with
another sequence."""

from __future__ import annotations

import random

import pytest
import torch

from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.runner.kv_cache import allocate_kv_caches

from .conftest import MODEL_CASES
from .helpers import run_schedule

BLOCK_SIZE = 16
NUM_BLOCKS = 12
ATOL = 1e-4


def load(ckpt, backend: str):
    arch = load_arch_config(ckpt.path)
    model = load_model(ckpt.path, arch, torch.float32, "cpu", backend, max_position=ckpt.max_position,
                       progress=False)
    return model, arch


def nan_caches(arch):
    """Caches whose unwritten slots are NaN: any read of one would poison the logits."""
    caches = allocate_kv_caches(arch, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
    for cache in caches:
        cache.fill_(float("nan"))
    return caches


def chunked_schedule(length: int) -> list[int]:
    """Two prefill chunks, then one token per step."""
    first = -(-length // 6)
    second = min(length // 2, length - first)
    return [first, second] + [1] * (length - first - second)


def shuffled_blocks(seed: int) -> list[int]:
    blocks = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(blocks)
    return blocks


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_prefill_and_chunked_match_transformers(tiny_checkpoint, name, backend):
    ckpt = tiny_checkpoint(name)
    model, arch = load(ckpt, backend)
    for length in ckpt.lengths:
        blocks = shuffled_blocks(length)[: -(-length // BLOCK_SIZE)]
        for schedule in ([length], chunked_schedule(length)):
            (logits,) = run_schedule(model, nan_caches(arch), [ckpt.token_ids[:length]], [blocks], [schedule],
                                     BLOCK_SIZE)
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, ckpt.hf_logits[length], atol=ATOL, rtol=1e-4,
                                       msg=lambda m: f"{name} {backend} L={length} {schedule}: {m}")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "mistral_swa", "qwen2_swa", "llama_dynamic_rope", "llama_relu",
                                  "mixtral", "mixtral_swa"])
def test_two_sequences_in_one_batch(tiny_checkpoint, name, backend):
    """Mixed steps (prefill chunk + 1-token row, decode + chunk) and decode-only steps, with
    interleaved, non-contiguous block tables."""
    ckpt = tiny_checkpoint(name)
    model, arch = load(ckpt, backend)
    long_ids, short_ids = ckpt.token_ids[: max(ckpt.lengths)], ckpt.other_ids
    blocks = shuffled_blocks(7)
    table_long = blocks[0::2][: -(-len(long_ids) // BLOCK_SIZE)]
    table_short = blocks[1::2][: -(-len(short_ids) // BLOCK_SIZE)]
    half = len(short_ids) // 2
    schedule_long = [len(long_ids) // 2 + 1] + [1] * (len(long_ids) - len(long_ids) // 2 - 1)
    schedule_short = [1, half] + [1] * (len(short_ids) - 1 - half)
    logits_long, logits_short = run_schedule(model, nan_caches(arch), [long_ids, short_ids],
                                             [table_long, table_short], [schedule_long, schedule_short],
                                             BLOCK_SIZE)
    torch.testing.assert_close(logits_long, ckpt.hf_logits[len(long_ids)], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(logits_short, ckpt.other_logits, atol=ATOL, rtol=1e-4)
