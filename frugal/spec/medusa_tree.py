"""The sparse candidate tree of Medusa heads, fixed once per engine (Medusa-1, Cai et al. 2024, §2.1.2).

A node is a path (r_1, ..., r_d) of top-k ranks: depth d holds the rank-r_d token of head d, and
its parent is the path without its last rank. Heads do not condition on the path, so a node's token
depends only on (d, r_d): the tree is a sparse subset of the Cartesian product of the heads' top-k.

The subset is chosen best-first by the estimated probability that greedy verification accepts the
whole path, prod_d a[d][r_d], with a[d][r] the held-out rate at which head d's rank-r token is the
base model's choice (`MedusaConfig.rank_accuracy`; independence across depths assumed, as Medusa
does). Since every factor is <= 1 a parent never scores below its child, so nodes come out in
topological order and every prefix of the node list is itself the best tree of its size — the
engine may cut a proposal to its token budget and still verify a sensible tree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

# Used when the heads carry no measured accuracy (untrained or hand-made heads): a head's rank-r
# token is right with probability 0.5^r * 0.6 at depth 1, decaying by 0.7 per depth.
_PRIOR_TOP1, _PRIOR_RANK_DECAY, _PRIOR_DEPTH_DECAY = 0.6, 0.5, 0.7


@dataclass(frozen=True)
class MedusaTree:
    paths: tuple[tuple[int, ...], ...]   # [n] node i+1's ranks, root excluded, best first
    parent_ids: tuple[int, ...]          # [n] parent node of node i+1 (0 = root)
    scores: tuple[float, ...]            # [n] estimated probability that node i+1 is accepted

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        """Ranks used, + 1: how many top tokens of each head the tree reads."""
        return max((r for p in self.paths for r in p), default=-1) + 1

    def expected_accepted(self) -> float:
        """Expected accepted candidates per step under the independence model: the sum over nodes of
        the probability that the node is accepted (children of a node are mutually exclusive)."""
        return sum(self.scores)


def prior_rank_accuracy(num_heads: int, top_k: int) -> list[list[float]]:
    return [[_PRIOR_TOP1 * _PRIOR_DEPTH_DECAY ** d * _PRIOR_RANK_DECAY ** r for r in range(top_k)]
            for d in range(num_heads)]


def build_tree(rank_accuracy: list[list[float]] | None, num_nodes: int, max_depth: int, top_k: int) -> MedusaTree:
    """The `num_nodes` best nodes (see the module docstring) over depths 1..max_depth and ranks
    0..top_k-1. Ties break toward shorter paths and lower ranks (deterministic)."""
    if num_nodes < 1 or max_depth < 1 or top_k < 1:
        raise ValueError(f"tree needs num_nodes, max_depth and top_k >= 1; got {num_nodes}, {max_depth}, {top_k}")
    if rank_accuracy is None:
        rank_accuracy = prior_rank_accuracy(max_depth, top_k)
    max_depth = min(max_depth, len(rank_accuracy))
    # Clamp to (0, 1]: a zero rate would still allow the node, just last.
    acc = [[min(1.0, max(float(a), 1e-9)) for a in row[:top_k]] for row in rank_accuracy[:max_depth]]
    heap: list[tuple[float, int, tuple[int, ...]]] = []

    def push(path: tuple[int, ...], parent_score: float) -> None:
        score = parent_score * acc[len(path) - 1][path[-1]]
        heapq.heappush(heap, (-score, len(path), path))

    for rank in range(len(acc[0])):
        push((rank,), 1.0)
    index_of: dict[tuple[int, ...], int] = {(): 0}
    paths, parents, scores = [], [], []
    while heap and len(paths) < num_nodes:
        negative_score, _, path = heapq.heappop(heap)
        paths.append(path)
        parents.append(index_of[path[:-1]])
        scores.append(-negative_score)
        index_of[path] = len(paths)
        if len(path) < max_depth:
            for rank in range(len(acc[len(path)])):
                push(path + (rank,), -negative_score)
    return MedusaTree(tuple(paths), tuple(parents), tuple(scores))


def tree_tokens(tree: MedusaTree, top_tokens: list[list[int]], num_nodes: int | None = None) -> list[int]:
    """top_tokens[d][r]: head d+1's rank-r token -> the token of each of the first `num_nodes` nodes."""
    paths = tree.paths if num_nodes is None else tree.paths[:num_nodes]
    return [top_tokens[len(path) - 1][path[-1]] for path in paths]
