"""The verifier on its own: exact greedy acceptance on chains and trees, and a chi-square test that
rejection sampling (single- and multi-candidate) emits tokens distributed exactly as the target."""

from __future__ import annotations

import pytest
import torch

from frugal.spec.verify import chain_parents, sampling_probs, verify_tree
from frugal.sampling_params import SamplingParams

VOCAB = 4


def one_hot_logits(best: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(best), VOCAB)
    logits[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return logits


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square goodness of fit (cells with zero expectation must be empty)."""
    total = counts.sum()
    mask = expected_probs > 0
    assert counts[~mask].sum() == 0, "a token the target never emits was emitted"
    expected = expected_probs[mask] * total
    stat = ((counts[mask] - expected) ** 2 / expected).sum()
    dof = int(mask.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


def test_greedy_chain_accepts_the_matching_prefix_then_the_target_token():
    # Target argmax after root, d1, d2, d3: 1, 2, 0, 3. Draft proposes 1, 2, 3.
    result = verify_tree(one_hot_logits([1, 2, 0, 3]), [1, 2, 3], chain_parents(3), greedy=True)
    assert result.token_ids == [1, 2, 0]
    assert result.accepted_nodes == [1, 2]


def test_greedy_chain_all_accepted_gets_a_bonus_token():
    result = verify_tree(one_hot_logits([1, 2, 3, 0]), [1, 2, 3], chain_parents(3), greedy=True)
    assert result.token_ids == [1, 2, 3, 0]


def test_greedy_chain_first_rejected_emits_the_target_argmax():
    result = verify_tree(one_hot_logits([3, 2]), [1], chain_parents(1), greedy=True)
    assert result.token_ids == [3] and result.num_accepted == 0


def test_greedy_tree_follows_the_branch_the_target_agrees_with():
    # Root children: node1=0, node2=1; node2's children node3=2, node4=3. Target: after root 1,
    # after node2 (token 1) 3, after node4 (token 3) 0.
    best = [1, 0, 3, 0, 0]
    result = verify_tree(one_hot_logits(best), [0, 1, 2, 3], [0, 0, 2, 2], greedy=True)
    assert result.accepted_nodes == [2, 4]
    assert result.token_ids == [1, 3, 0]


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="parents must precede"):
        verify_tree(one_hot_logits([0, 0]), [1], [1], greedy=True)


def _random_dist(generator: torch.Generator, rows: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, VOCAB, generator=generator) * 1.5, dim=-1)


def test_chain_rejection_sampling_preserves_the_joint_target_distribution():
    """Draft chain of 2 from q; the first two emitted tokens must follow p(x1) p(x2 | x1)."""
    gen = torch.Generator().manual_seed(0)
    p_root = _random_dist(gen, 1)[0]            # [V]
    p_next = _random_dist(gen, VOCAB)           # [V, V]: p(x2 | x1)
    p_third = _random_dist(gen, VOCAB * VOCAB)  # [V*V, V]: p(x3 | x1, x2)
    q_root = _random_dist(gen, 1)[0]
    q_next = _random_dist(gen, VOCAB)
    counts = torch.zeros(VOCAB * VOCAB)
    trials = 12000
    for _ in range(trials):
        d1 = int(torch.multinomial(q_root, 1, generator=gen))
        d2 = int(torch.multinomial(q_next[d1], 1, generator=gen))
        target = torch.stack([p_root, p_next[d1], p_third[d1 * VOCAB + d2]])
        draft = torch.stack([q_root, q_next[d1]])
        result = verify_tree(target, [d1, d2], chain_parents(2), greedy=False, draft_probs=draft, generator=gen)
        tokens = result.token_ids
        if len(tokens) == 1:  # plain decoding continues from the target's own token
            tokens = tokens + [int(torch.multinomial(p_next[tokens[0]], 1, generator=gen))]
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    expected = (p_root.unsqueeze(1) * p_next).reshape(-1)
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("deterministic", [False, True])
def test_tree_multi_candidate_sampling_preserves_the_target_distribution(deterministic: bool):
    """Three root children, i.i.d. from q (SpecInfer) or the draft's top-3 tokens (one-hot q)."""
    gen = torch.Generator().manual_seed(1)
    p_root = _random_dist(gen, 1)[0]
    q_root = _random_dist(gen, 1)[0]
    p_child = _random_dist(gen, VOCAB)
    counts = torch.zeros(VOCAB)
    accepted = 0
    trials = 12000
    for _ in range(trials):
        if deterministic:
            children = q_root.topk(3).indices.tolist()
            draft = None
        else:
            children = torch.multinomial(q_root, 3, replacement=True, generator=gen).tolist()
            draft = q_root.expand(3, VOCAB)
        target = torch.cat([p_root.unsqueeze(0), p_child[children]])
        result = verify_tree(target, children, [0, 0, 0], greedy=False, draft_probs=draft, generator=gen)
        counts[result.token_ids[0]] += 1
        accepted += result.num_accepted
    assert chi_square_p_value(counts, p_root) > 1e-3
    assert accepted > 0


def test_chain_with_a_bad_draft_still_matches_the_target():
    """A draft that proposes a token the target gives probability ~0 is always rejected."""
    gen = torch.Generator().manual_seed(2)
    p_root = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = torch.zeros(VOCAB)
    for _ in range(4000):
        target = torch.stack([p_root, torch.full((VOCAB,), 0.25)])
        result = verify_tree(target, [3], chain_parents(1), greedy=False, generator=gen)
        assert result.num_accepted == 0
        counts[result.token_ids[0]] += 1
    assert chi_square_p_value(counts, p_root) > 1e-3


def test_sampling_probs_applies_temperature_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = sampling_probs(logits, SamplingParams(temperature=0.5, top_k=2))
    assert probs[0, 2:].sum() == 0
    expected = torch.softmax(torch.tensor([4.0, 2.0]), dim=0)
    torch.testing.assert_close(probs[0, :2], expected)
