"""The token tree a draft grows (spec/tree_draft.py): nodes, their one-token KV slots, and the
conversion to a `Proposal`.

Nodes are stored in level order (every parent before its children, each level in the order it was
drafted), so any prefix of the nodes is again a tree, as the engine requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from frugal.core.block_pool import KVCacheBlock
from frugal.request import Request
from frugal.spec.proposer import Proposal


@dataclass(eq=False)
class TreeNode:
    token: int
    parent: int                    # index of the parent node (-1 for the root)
    depth: int
    confidence: float              # product of the draft probabilities along the path from the root
    slot: KVCacheBlock | None = None   # set once the node is fed to the draft
    q: torch.Tensor | None = None  # [V] the distribution the token was drawn from (sampling only)
    children: list[int] = field(default_factory=list)
    uncertainty: float = 0.0       # sum of the path's surprisals, nats (-ln(confidence) without underflow)


@dataclass(eq=False)
class DraftTree:
    """Node 0 is the root (fed); `base` = slot ids of the positions before it. Its shape depends only
    on its root's prefix, limits, threshold and generator, fixed at creation, so a tree drafted
    during verification is the very tree the next round would draft (seeded output does not
    depend on thread timing)."""

    base: list[int]
    nodes: list[TreeNode]
    max_nodes: int                 # candidates (nodes besides the root) allowed
    max_depth: int
    threshold: float               # verification threshold (nats), fixed for the whole tree
    generator: torch.Generator | None = None   # its draws (seeded requests: by seed and root position)

    def table(self, index: int) -> list[int]:
        """Slot ids of positions 0 .. the node's own, for a fed node."""
        path = []
        while index >= 0:
            node = self.nodes[index]
            path.append(node.slot.block_id)
            index = node.parent
        return self.base + path[::-1]

    def most_confident_path(self) -> list[int]:
        """Node indices root-exclusive, following the most confident child down to a leaf."""
        path, index = [], 0
        while self.nodes[index].children:
            index = max(self.nodes[index].children, key=lambda c: self.nodes[c].confidence)
            path.append(index)
        return path

    def slots(self) -> list[KVCacheBlock]:
        return [node.slot for node in self.nodes if node.slot is not None]


@dataclass(eq=False)
class Prefetch:
    """A tree drafted during verification for a guessed outcome: valid iff the verified tokens
    become exactly `tokens`; its root (the guessed bonus token) is fed."""

    tokens: list[int]
    tree: DraftTree
    pending: list[int] = field(default_factory=list)   # nodes drafted but not yet fed (interrupted)


def draft_seed(seed: int, num_known: int) -> int:
    """The draft's seed for a seeded request's tree rooted after `num_known` tokens: never the
    request's own seed, which seeds the target's acceptance coins (equal streams would correlate
    each draw with its acceptance test and bias the emitted tokens)."""
    return (seed * 0x9E3779B97F4A7C15 + num_known * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019) % 2**63


def path_to(tree: DraftTree, index: int) -> list[int]:
    """Node indices from the root's child down to `index` (empty for the root)."""
    path = []
    while index > 0:
        path.append(index)
        index = tree.nodes[index].parent
    return path[::-1]


def tree_proposal(tree: DraftTree, request: Request) -> Proposal | None:
    nodes = tree.nodes[1:]
    if not nodes:
        return None
    probs = None
    if not request.sampling_params.is_greedy:
        probs = torch.stack([node.q for node in nodes])  # [n, V]
    return Proposal([node.token for node in nodes], probs, [node.parent for node in nodes])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
