"""The input builder's token-tree layout: positions by depth, the ancestor mask, the chain fast path."""

from __future__ import annotations

import torch

from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
from frugal.request import Request
from frugal.runner.input_builder import build_model_input, is_chain, tree_attention_mask, tree_depths
from frugal.sampling_params import SamplingParams

BLOCK = 4


def scheduled(start: int, known: list[int], spec: list[int], parents: list[int] | None) -> ScheduledRequest:
    request = Request("r", [5] * (start + len(known)), SamplingParams())
    num_new = len(known) + len(spec)
    return ScheduledRequest(request=request, start_pos=start, num_new_tokens=num_new, token_ids=known + spec,
                            block_ids=[3, 1, 4, 0], spec_token_ids=spec, spec_parent_ids=parents)


def test_depths_and_chain_detection():
    assert tree_depths([0, 0, 1, 2, 3]) == [0, 1, 1, 2, 2, 3]
    assert is_chain(None) and is_chain([0, 1, 2]) and not is_chain([0, 0])


def test_tree_mask_is_ancestor_or_self_after_the_known_rows():
    # Two known rows (the root last), then nodes 1..4 with parents 0, 0, 1, 2.
    mask = tree_attention_mask(2, [0, 0, 1, 2])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],   # node 1
                             [1, 1, 0, 1, 0, 0],   # node 2: not node 1
                             [1, 1, 1, 0, 1, 0],   # node 3 under node 1
                             [1, 1, 0, 1, 0, 1]],  # node 4 under node 2
                            dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_builder_positions_slots_and_masks():
    tree = scheduled(5, [7], [10, 11, 12, 13], [0, 0, 1, 2])
    chain = scheduled(3, [7], [10, 11], [0, 1])
    out = build_model_input(SchedulerOutput([tree, chain], 8), BLOCK, torch.device("cpu"))
    # Tree rows: root at 5, nodes at 5 + depth; slots stay in node order (positions 5..9).
    assert out.positions.tolist() == [5, 6, 6, 7, 7] + [3, 4, 5]
    slots = [[3, 1, 4, 0][p // BLOCK] * BLOCK + p % BLOCK for p in range(5, 10)]
    assert out.attn_metadata.slot_mapping.tolist()[:5] == slots
    masks = out.attn_metadata.tree_masks
    assert masks[1] is None and torch.equal(masks[0], tree_attention_mask(1, [0, 0, 1, 2]))
    assert [(g[1], g[2]) for g in out.sample_groups] == [(0, 5), (5, 3)]
    # Chains alone keep the maskless path.
    alone = build_model_input(SchedulerOutput([chain], 3), BLOCK, torch.device("cpu"))
    assert alone.attn_metadata.tree_masks is None and alone.positions.tolist() == [3, 4, 5]
