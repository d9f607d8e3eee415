"""Typical acceptance (Medusa, Cai et al. 2024, §2.3.1): a LOSSY verifier for sampled requests.

A candidate x at node j is accepted when the target's (temperature-scaled, filtered) probability of
it is typical:  p_j(x) > min(epsilon, delta * exp(-H(p_j))),  H the entropy of p_j. Of all tree
paths accepted from the root the longest wins (ties: the earliest node, i.e. the best-scored
branch); one more token is then sampled from the target's distribution after it.

Unlike speculative sampling (verify.py) the emitted tokens are NOT distributed as the target would
sample them: plausible-but-not-sampled continuations are accepted more often. It is an opt-in
trade of fidelity for acceptance; greedy requests never use it (greedy verification is exact).
"""

from __future__ import annotations

import torch

from frugal.request import Request
from frugal.spec.decoder import SpecDecoder
from frugal.spec.verify import VerifyResult, _children, accepted_ids, chain_parents, sampling_probs

DEFAULT_EPSILON = 0.09   # Medusa's posterior_threshold
DEFAULT_DELTA = 0.3      # Medusa's posterior_alpha (sqrt of epsilon)


def typical_thresholds(probs: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """probs [rows, V] -> the acceptance threshold of each row [rows]: min(eps, delta * exp(-H))."""
    probs = probs.float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)  # [rows]
    return torch.clamp(delta * torch.exp(-entropy), max=epsilon)


def verify_tree_typical(target_probs: torch.Tensor, draft_token_ids: list[int], parent_ids: list[int], *,
                        epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                        generator: torch.Generator | None = None) -> VerifyResult:
    """Accept the longest typical root-to-node path, then sample one target token after it.

    target_probs: [n + 1, V], row j = the target's sampling distribution after the path ending at node j
    (verify.sampling_probs of the logits). Same tree convention as verify.verify_tree.
    """
    num_nodes = len(draft_token_ids) + 1
    assert target_probs.dim() == 2 and target_probs.shape[0] == num_nodes, (tuple(target_probs.shape), num_nodes)
    assert len(parent_ids) == len(draft_token_ids), (len(parent_ids), len(draft_token_ids))
    _children(parent_ids, num_nodes)  # validates the topological order
    probs = target_probs.float()
    threshold = typical_thresholds(probs, epsilon, delta).tolist()  # [n + 1]
    token_probs = probs[torch.tensor(parent_ids, dtype=torch.long), torch.tensor(draft_token_ids)].tolist() \
        if draft_token_ids else []  # [n] p_parent(token)
    depth = [0] * num_nodes  # 0 = root or not reachable through accepted nodes
    best = 0
    for node in range(1, num_nodes):
        parent = parent_ids[node - 1]
        if (parent == 0 or depth[parent] > 0) and token_probs[node - 1] > threshold[parent]:
            depth[node] = depth[parent] + 1
            if depth[node] > depth[best]:
                best = node
    path: list[int] = []
    node = best
    while node != 0:
        path.append(node)
        node = parent_ids[node - 1]
    path.reverse()
    token = int(torch.multinomial(probs[best], 1, generator=generator))
    return VerifyResult(accepted_ids(draft_token_ids, path) + [token], path)


class TypicalSpecDecoder(SpecDecoder):
    """A SpecDecoder whose sampled requests are verified by typical acceptance (lossy, see the module
    docstring); greedy requests keep exact greedy verification."""

    def __init__(self, *args, epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epsilon, self.delta = epsilon, delta

    def verify(self, request: Request, spec_token_ids: list[int], logits: torch.Tensor,
               generator: torch.Generator | None, parent_ids: list[int] | None = None) -> VerifyResult:
        params = request.sampling_params
        if params.is_greedy:
            return super().verify(request, spec_token_ids, logits, generator, parent_ids=parent_ids)
        parents = chain_parents(len(spec_token_ids)) if parent_ids is None else parent_ids
        self._draft_probs.pop(request.request_id, None)  # typical acceptance ignores draft distributions
        result = verify_tree_typical(sampling_probs(logits, params), spec_token_ids, parents,
                                     epsilon=self.epsilon, delta=self.delta, generator=generator)
        depths = [0]
        for parent in parents:
            depths.append(depths[parent] + 1)
        self._record(request.request_id, len(spec_token_ids), result.num_accepted, len(result.token_ids),
                     max_depth=max(depths))
        return result
