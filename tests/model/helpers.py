"""Test-only stand-in for the runner: builds the flat batch and AttentionMetadata for a set of
sequences, and drives a model through prefill chunks and decode steps over a paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.layers.attention_metadata import AttentionMetadata


@dataclass
class SeqChunk:
    """One request's share of a step: `token_ids` are the new tokens, placed after `num_computed`
    tokens already in the cache; `block_ids` is the request's block table (must cover the sequence)."""

    token_ids: list[int]
    num_computed: int
    block_ids: list[int]


def build_batch(chunks: list[SeqChunk], block_size: int, tree_masks=None):
    """-> (input_ids [num_tokens], positions [num_tokens], AttentionMetadata)."""
    input_ids, positions, slots, query_start_loc, query_lens, seq_lens = [], [], [], [0], [], []
    for chunk in chunks:
        seq_len = chunk.num_computed + len(chunk.token_ids)
        assert len(chunk.block_ids) * block_size >= seq_len, "block table too short"
        for pos in range(chunk.num_computed, seq_len):
            positions.append(pos)
            slots.append(chunk.block_ids[pos // block_size] * block_size + pos % block_size)
        input_ids.extend(chunk.token_ids)
        query_lens.append(len(chunk.token_ids))
        query_start_loc.append(query_start_loc[-1] + len(chunk.token_ids))
        seq_lens.append(seq_len)
    max_blocks = max(len(c.block_ids) for c in chunks)
    block_tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int64)
    for i, chunk in enumerate(chunks):
        block_tables[i, :len(chunk.block_ids)] = torch.tensor(chunk.block_ids)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=block_tables,
        query_start_loc=query_start_loc, query_lens=query_lens, seq_lens=seq_lens, block_size=block_size,
        tree_masks=tree_masks)
    return torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), metadata


@torch.no_grad()
def run_schedule(model, kv_caches, sequences: list[list[int]], block_tables: list[list[int]],
                 schedules: list[list[int]], block_size: int) -> list[torch.Tensor]:
    """Feed every sequence through the model in steps: at step s sequence i gets `schedules[i][s]` new
    tokens (sequences whose schedule is exhausted drop out). -> per sequence logits [len, vocab]."""
    logits = [[] for _ in sequences]
    done = [0] * len(sequences)
    num_steps = max(len(s) for s in schedules)
    for step in range(num_steps):
        chunks, owners = [], []
        for i, seq in enumerate(sequences):
            if step < len(schedules[i]):
                n = schedules[i][step]
                chunks.append(SeqChunk(seq[done[i]:done[i] + n], done[i], block_tables[i]))
                owners.append(i)
        input_ids, positions, metadata = build_batch(chunks, block_size)
        step_logits = model.compute_logits(model(input_ids, positions, kv_caches, metadata))
        for j, i in enumerate(owners):
            start, end = metadata.query_start_loc[j], metadata.query_start_loc[j + 1]
            logits[i].append(step_logits[start:end])
            done[i] += end - start
    for i, seq in enumerate(sequences):
        assert done[i] == len(seq), (done[i], len(seq))
    return [torch.cat(x) for x in logits]
