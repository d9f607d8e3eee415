"""LLMCad's drafting policy (Xu et al. 2023, "LLMCad: Fast and Scalable On-device Large Language
Model Inference"): how wide a token tree branches, and when drafting stops and calls verification.

- Confidence of a drafted node = the draft's probability of its token; the accumulated uncertainty of
  a path is the sum of the surprisals -ln(confidence) along it, in nats (-ln of the draft's own
  probability of the whole path). Nats, not a probability: a small draft is often badly calibrated
  (on the bundled pair its top-1 probability is ~0.1 while the target agrees with it ~70% of the
  time), and an additive scale lets the threshold settle wherever the observed acceptance puts it.
- Branching: a node is uncertain when its draft distribution's runner-up is at least `branch` times
  as likely as its best token (a ratio, again indifferent to calibration); it gets `width`
  children, others one.
- Verification trigger: a node is expanded (fed to the draft for its children) only while its path's
  accumulated uncertainty is at most the request's threshold; when no node qualifies (or depth /
  node limits are hit) drafting stops and the tree goes to the target.
- Self-adjusting fallback (`AdaptiveThreshold`): after each verification, an accepted path that ran
  to a leaf of the tree (the draft stopped too early) raises the threshold by `step`; a rejection
  inside the tree (the draft kept going past an error) lowers it by `step`. The threshold thus
  tracks the level at which half the verifications end on a leaf, per request.

Invariant needed for lossless sampling (verify.py): which nodes exist and in which order may depend
on the draft's draws of their *ancestors and other branches* only, never on the node's own drawn
token. So the number of children is decided from the parent's distribution before drawing them,
and the node budget is shared out by parent, not by the children's own confidences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeShape:
    """Limits of one request's draft tree (validated in SpecConfig)."""

    max_depth: int = 5          # k: the deepest candidate
    max_nodes: int = 12         # candidates per tree (the target verifies all of them)
    width: int = 2              # children of an uncertain node
    branch: float = 0.5         # a node is uncertain when its draft top-2 / top-1 probability ratio is >= this


def num_children(runner_up_ratio: float, shape: TreeShape) -> int:
    """Children to draft under a node whose draft distribution has top-2 / top-1 probability ratio
    `runner_up_ratio`."""
    return shape.width if runner_up_ratio >= shape.branch else 1


def allot_children(frontier: list[tuple[float, float]], budget: int, shape: TreeShape) -> list[int]:
    """frontier: (path confidence, top-2 / top-1 ratio of its draft distribution) per node being
    expanded -> children per node, most confident paths served first, `budget` in all (the node
    budget of the tree left). Every node served gets its first child before any gets a sibling."""
    wanted = [num_children(ratio, shape) for _, ratio in frontier]
    counts = [0] * len(frontier)
    order = sorted(range(len(frontier)), key=lambda i: -frontier[i][0])
    for round_ in range(max(wanted, default=0)):
        for i in order:
            if budget <= 0:
                return counts
            if wanted[i] > round_:
                counts[i] += 1
                budget -= 1
    return counts


def draw_children(q: torch.Tensor, count: int, greedy: bool, generator: torch.Generator | None) -> list[int]:
    """q [V]: the draft distribution at a node -> `count` child tokens: the top-`count` tokens
    (greedy: deterministic candidates) or `count` i.i.d. draws from q (SpecInfer's multi-candidate
    sampling; duplicates stay, since dropping them would bias the verifier's residuals)."""
    if greedy:
        return q.topk(count).indices.tolist()
    return torch.multinomial(q, count, replacement=True, generator=generator).tolist()


@dataclass
class _ThresholdState:
    value: float
    leaf_ends: int = 0
    inner_ends: int = 0


def surprisal(prob: float) -> float:
    """-ln(prob) in nats (the uncertainty a node adds to its path); inf for prob 0."""
    return -math.log(prob) if prob > 0.0 else math.inf


class AdaptiveThreshold:
    """Per-request verification threshold on accumulated uncertainty (nats), in [low, high]."""

    def __init__(self, initial: float, *, step: float = 0.5, low: float = 0.0, high: float = 30.0,
                 enabled: bool = True):
        assert initial >= 0.0 and step > 0.0, (initial, step)
        self.initial = min(max(initial, low), high)
        self.step = step
        self.low = low
        self.high = high
        self.enabled = enabled
        self._states: dict[str, _ThresholdState] = {}

    def value(self, request_id: str) -> float:
        state = self._states.get(request_id)
        return self.initial if state is None else state.value

    def value_after(self, request_id: str, ended_on_leaf: bool) -> float:
        """The threshold once one more verification is observed."""
        value = self.value(request_id)
        if self.enabled:
            value += self.step if ended_on_leaf else -self.step
        return min(max(value, self.low), self.high)

    def observe(self, request_id: str, ended_on_leaf: bool) -> None:
        """One verification of the request's tree: did the accepted path run to a leaf?"""
        state = self._states.setdefault(request_id, _ThresholdState(self.initial))
        if ended_on_leaf:
            state.leaf_ends += 1
        else:
            state.inner_ends += 1
        if self.enabled:
            delta = self.step if ended_on_leaf else -self.step
            state.value = min(max(state.value + delta, self.low), self.high)

    def counts(self, request_id: str) -> tuple[int, int]:
        """(verifications that ended on a leaf, that ended inside the tree) so far."""
        state = self._states.get(request_id)
        return (0, 0) if state is None else (state.leaf_ends, state.inner_ends)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
