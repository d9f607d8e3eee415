"""Per-request speculation length: shorten or switch off speculation that does not pay.

Cost model: a target pass verifying k candidates costs `1 + verify_cost * k` plain decode steps and
drafting them `draft_cost * k`; with per-token acceptance a (candidates accepted independently while
the chain holds) the pass yields E[tokens] = (1 - a^(k+1)) / (1 - a). The next k is the one in 0..k_max
maximising E[tokens] / cost; k = 0 (plain decoding, cost 1, one token) wins whenever speculation
would be slower. a is estimated per request from exponentially weighted counts of accepted tokens
over trials (a rejection ends a chain: one failed trial). While off, the request re-probes with one
candidate every `probe_interval` steps so that a later repetitive stretch is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verification of a k-chain yields when each candidate is accepted w.p. `acceptance`."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def best_length(acceptance: float, k_max: int, verify_cost: float, draft_cost: float) -> int:
    """The k in 0..k_max with the most expected tokens per unit of (plain decode step) cost."""
    return max(range(k_max + 1),
               key=lambda k: (expected_tokens(acceptance, k) / (1.0 + (verify_cost + draft_cost) * k), -k))


@dataclass
class _State:
    accepted: float = 2.0      # weighted accepted candidates (optimistic prior: a = 2/3)
    trials: float = 3.0        # weighted trials
    k: int = 0
    steps_off: int = 0


class AdaptiveLength:
    def __init__(self, k_max: int, verify_cost: float, draft_cost: float, *, enabled: bool = True,
                 decay: float = 0.8, probe_interval: int = 8):
        self.k_max = k_max
        self.verify_cost = verify_cost
        self.draft_cost = draft_cost
        self.enabled = enabled
        self.decay = decay
        self.probe_interval = probe_interval
        self._states: dict[str, _State] = {}

    def acceptance(self, request_id: str) -> float:
        state = self._states.get(request_id) or _State()
        return state.accepted / state.trials

    def next_length(self, request_id: str) -> int:
        """How many candidates to propose for this request this step (0 = decode plainly)."""
        if not self.enabled:
            return self.k_max
        state = self._states.setdefault(request_id, _State())
        state.k = best_length(state.accepted / state.trials, self.k_max, self.verify_cost, self.draft_cost)
        if state.k == 0:
            state.steps_off += 1
            if state.steps_off >= self.probe_interval:
                state.steps_off = 0
                return 1
        else:
            state.steps_off = 0
        return state.k

    def observe(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """Record one verification: `num_accepted` of `num_proposed` chain candidates accepted."""
        if num_proposed <= 0:
            return
        state = self._states.setdefault(request_id, _State())
        trials = num_accepted + (1 if num_accepted < num_proposed else 0)
        state.accepted = self.decay * state.accepted + num_accepted
        state.trials = self.decay * state.trials + trials

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
