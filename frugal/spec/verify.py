"""Verification of speculative candidates: one pure function for chains and trees.

A candidate set is a tree rooted at node 0 (the last known token); node i (1..n) holds draft token
`draft_token_ids[i-1]` and its parent `parent_ids[i-1] < i`. A chain is the tree with parents
0, 1, ..., n-1. `target_probs[j]` is the target's next-token distribution after the path ending at
node j ([n + 1, V]).

Greedy (exact): walk from the root, following the child whose token is the target's argmax; the
first argmax with no matching child is emitted and the walk stops. The output equals plain greedy
decoding token for token.

Sampling (lossless): multi-candidate speculative sampling (Leviathan et al. 2023 / Chen et al. 2023
for one candidate; SpecInfer, Miao et al. 2024, for several). At node j with residual r = p_j, each
child c (drawn from its draft distribution q_c) is accepted with probability min(1, r(x_c)/q_c(x_c));
on rejection r <- normalise(max(r - q_c, 0)). When every child is rejected one token is drawn from r.
A deterministic candidate (prompt lookup, top-k tree children) has q_c = one-hot(x_c): it is
accepted with probability r(x_c) and rejection zeroes x_c in r. Either way every emitted token is
distributed exactly as the target would sample it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.sample.sampler import apply_min_p, apply_top_k_top_p
from frugal.sampling_params import SamplingParams


@dataclass
class VerifyResult:
    token_ids: list[int]        # accepted draft tokens, then one token from the target (len >= 1)
    accepted_nodes: list[int]   # the tree nodes (1..n) whose tokens were accepted, root to leaf

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


def chain_parents(num_draft_tokens: int) -> list[int]:
    """Parent ids of a chain of `num_draft_tokens` candidates: node i's parent is i - 1."""
    return list(range(num_draft_tokens))


def _children(parent_ids: list[int], num_nodes: int) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for index, parent in enumerate(parent_ids, start=1):
        if not 0 <= parent < index:
            raise ValueError(f"node {index} has parent {parent}; parents must precede their children")
        children[parent].append(index)
    return children


def verify_tree(target_probs: torch.Tensor, draft_token_ids: list[int], parent_ids: list[int], *,
                greedy: bool, draft_probs: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> VerifyResult:
    """Accept a root-to-node path of the candidate tree and append one target token.

    target_probs: [n + 1, V] (for greedy, logits work too: only the argmax is read).
    draft_probs: [n, V], row i-1 = the distribution node i's token was drawn from; None (or a row of
    NaN) means deterministic candidates (one-hot). Siblings drawn from one q must be i.i.d. draws.
    """
    num_nodes = len(draft_token_ids) + 1
    assert target_probs.dim() == 2 and target_probs.shape[0] == num_nodes, (tuple(target_probs.shape), num_nodes)
    assert len(parent_ids) == len(draft_token_ids), (len(parent_ids), len(draft_token_ids))
    children = _children(parent_ids, num_nodes)
    accepted: list[int] = []
    node = 0
    if greedy:
        best = target_probs.argmax(dim=-1).tolist()  # [n + 1]
        while True:
            match = next((c for c in children[node] if draft_token_ids[c - 1] == best[node]), None)
            if match is None:
                return VerifyResult(accepted_ids(draft_token_ids, accepted) + [best[node]], accepted)
            accepted.append(match)
            node = match

    probs = target_probs.float()
    while True:
        residual = probs[node]
        next_node = None
        for child in children[node]:
            token = draft_token_ids[child - 1]
            q = None if draft_probs is None else draft_probs[child - 1].float()
            if q is not None and torch.isnan(q[0]):
                q = None
            q_token = 1.0 if q is None else float(q[token])
            ratio = float(residual[token]) / q_token if q_token > 0 else 0.0
            if ratio >= 1.0 or float(torch.rand((), generator=generator, device=residual.device)) < ratio:
                next_node = child
                break
            if q is None:
                reduced = residual.clone()
                reduced[token] = 0.0
            else:
                reduced = (residual - q).clamp_(min=0.0)
            total = float(reduced.sum())
            if total > 0:  # total == 0 only when r == q, where a rejection has probability 0
                residual = reduced / total
        if next_node is None:
            token = int(torch.multinomial(residual, 1, generator=generator))
            return VerifyResult(accepted_ids(draft_token_ids, accepted) + [token], accepted)
        accepted.append(next_node)
        node = next_node


def accepted_ids(draft_token_ids: list[int], nodes: list[int]) -> list[int]:
    return [draft_token_ids[node - 1] for node in nodes]


def speculation_supported(params: SamplingParams) -> bool:
    """Whether a request's sampling can be verified from per-position distributions alone:
    penalties depend on the tokens before each position and logprobs are reported per sampled
    token by the plain sampler, so such requests decode without speculation."""
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and params.logprobs is None)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[rows, V] logits -> the distributions the Sampler draws from for this request (temperature,
    top-k, top-p, min-p; sampler.py's order). Not for greedy requests."""
    logits = logits.float() / params.temperature
    rows = logits.shape[0]
    top_k = torch.full((rows,), params.top_k, dtype=torch.int64, device=logits.device) if params.top_k else None
    top_p = torch.full((rows,), params.top_p, device=logits.device) if params.top_p < 1.0 else None
    logits = apply_top_k_top_p(logits, top_k, top_p)
    if params.min_p > 0:
        logits = apply_min_p(logits, torch.full((rows,), params.min_p, device=logits.device))
    return logits.softmax(dim=-1)
