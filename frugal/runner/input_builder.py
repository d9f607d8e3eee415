"""Turn a SchedulerOutput into the flat tensors one model forward pass needs.

Invariant: rows of `input_ids` are grouped by request in `SchedulerOutput.scheduled` order; request
i's rows are `query_start_loc[i] : query_start_loc[i+1]`. `logits_indices` lists, for each request
that samples this step, the rows whose logits are needed: the last row for plain decoding, the last
`1 + len(spec_token_ids)` rows for a speculative step (the verifier reads them in order).

Token trees (`ScheduledRequest.spec_parent_ids`, spec/proposer.py): the candidate rows keep the KV
slots of positions root + 1 .. root + n in node order, but node i is computed at position
root + depth(i) and `attn_metadata.tree_masks` lets it see the earlier rows of the step up to the root
and, among the candidates, only its ancestors and itself. Chains take the plain causal path (no mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
from frugal.layers.attention_metadata import AttentionMetadata


def is_chain(parent_ids: list[int] | None) -> bool:
    """Whether candidates with these parent ids form a chain (None = a chain)."""
    return parent_ids is None or all(parent == index for index, parent in enumerate(parent_ids))


def tree_depths(parent_ids: list[int]) -> list[int]:
    """[n + 1] depth of the root (0) and of each node 1..n."""
    depths = [0]
    for index, parent in enumerate(parent_ids, start=1):
        assert 0 <= parent < index, f"node {index} has parent {parent}; parents must precede their children"
        depths.append(depths[parent] + 1)
    return depths


def tree_attention_mask(num_known: int, parent_ids: list[int]) -> torch.Tensor:
    """bool [q, q] with q = num_known + n: the step's known rows (the root last) are causal; node i's
    row sees every known row and, among the nodes, its ancestors and itself."""
    num_nodes = len(parent_ids)
    size = num_known + num_nodes
    mask = torch.zeros((size, size), dtype=torch.bool)
    mask[:, :num_known] = torch.tril(torch.ones((size, num_known), dtype=torch.bool))
    for index, parent in enumerate(parent_ids, start=1):
        row = num_known - 1 + index
        if parent > 0:
            mask[row, num_known:] = mask[num_known - 1 + parent, num_known:]
        mask[row, row] = True
    return mask


@dataclass
class ModelInput:
    input_ids: torch.Tensor          # [num_tokens] int64
    positions: torch.Tensor          # [num_tokens] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor     # [num_logits_rows] int64
    # For each sampling request: (scheduled request, first row in the logits, number of rows).
    sample_groups: list[tuple[ScheduledRequest, int, int]]


def build_model_input(scheduler_output: SchedulerOutput, block_size: int, device: torch.device) -> ModelInput:
    token_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start_loc = [0]
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    logits_rows: list[int] = []
    sample_groups: list[tuple[ScheduledRequest, int, int]] = []
    tree_masks: list[torch.Tensor | None] = []

    for sched in scheduler_output.scheduled:
        num_new = sched.num_new_tokens
        assert len(sched.token_ids) == num_new, (sched.request_id, len(sched.token_ids), num_new)
        start = sched.start_pos
        end = start + num_new
        assert len(sched.block_ids) * block_size >= end, (sched.request_id, len(sched.block_ids), end)
        token_ids.extend(sched.token_ids)
        if is_chain(sched.spec_parent_ids):
            positions.extend(range(start, end))
            tree_masks.append(None)
        else:
            num_spec = len(sched.spec_parent_ids)
            assert num_spec == len(sched.spec_token_ids) and num_spec < num_new, (sched.request_id, num_spec)
            root = end - 1 - num_spec  # position of the last known token
            positions.extend(range(start, root))
            positions.extend(root + depth for depth in tree_depths(sched.spec_parent_ids))
            tree_masks.append(tree_attention_mask(num_new - num_spec, sched.spec_parent_ids).to(device))
        block_ids = sched.block_ids
        slot_mapping.extend(block_ids[pos // block_size] * block_size + pos % block_size for pos in range(start, end))
        row_end = query_start_loc[-1] + num_new
        query_start_loc.append(row_end)
        query_lens.append(num_new)
        seq_lens.append(end)
        tables.append(block_ids[: (end + block_size - 1) // block_size])
        if sched.needs_sample:
            num_rows = 1 + len(sched.spec_token_ids)
            sample_groups.append((sched, len(logits_rows), num_rows))
            logits_rows.extend(range(row_end - num_rows, row_end))

    max_blocks = max((len(t) for t in tables), default=0)
    block_tables = torch.zeros((len(tables), max(max_blocks, 1)), dtype=torch.int64)  # [num_reqs, max_blocks]
    for i, table in enumerate(tables):
        if table:
            block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int64)

    def to_device(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        block_tables=block_tables.to(device, non_blocking=True),
        query_start_loc=query_start_loc,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_size=block_size,
        tree_masks=tree_masks if any(mask is not None for mask in tree_masks) else None,
    )
    return ModelInput(
        input_ids=to_device(token_ids),
        positions=to_device(positions),
        attn_metadata=metadata,
        logits_indices=to_device(logits_rows),
        sample_groups=sample_groups,
    )
