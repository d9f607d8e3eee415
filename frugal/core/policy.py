"""Scheduling policies: the order in which requests get tokens, and who gives way when KV runs out.

The scheduler owns three plain lists: `waiting` (new and recompute-preempted requests, no KV),
`running` (KV resident in the engine's pool; scheduled this step or paused) and `swapped` (KV in
the slow tier, see `core/swap.py`). Once per step the policy ranks all of them, highest priority
first; the scheduler walks that ranking, giving tokens to at most `max_num_seqs` of them, so a
ranking that changes between steps preempts at iteration granularity (Orca's iteration-level
scheduling; FastServe's skip-join MLFQ in `core/mlfq.py`). The policy also picks preemption victims
and hears how long each step took and whom it served (for time-slicing policies).

Policies: `fcfs` (the default, for batch-1 and throughput use), `mlfq`, `skip-join-mlfq`
(FastServe, Wu et al. 2023, "Fast Distributed Inference Serving for Large Language Models") and
`sjf-oracle` (shortest remaining job first from the true output length: a benchmark upper bound).

Always true: a policy only reorders or inserts into the lists it is handed, or returns a ranking
that is a permutation of them; it never drops a request and never touches KV blocks.
"""

from __future__ import annotations

import bisect
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from frugal.core.prefill_profile import PrefillProfile
from frugal.errors import ConfigError
from frugal.request import Request


class SchedulingPolicy(ABC):
    name: str = "base"
    # True when the policy cannot work without a measured prefill profile (the engine then loads or
    # measures one and passes it as the `prefill_profile` option).
    requires_prefill_profile: bool = False

    @classmethod
    def needs_prefill_profile(cls, options: dict) -> bool:
        """Whether `make_policy(cls.name, **options)` needs the `prefill_profile` option."""
        return cls.requires_prefill_profile

    @abstractmethod
    def add_waiting(self, waiting: list[Request], request: Request) -> None:
        """Insert a newly arrived request into `waiting` (its `arrival_time` is on the scheduler's clock)."""

    @abstractmethod
    def add_preempted(self, waiting: list[Request], request: Request) -> None:
        """Insert a request that was just preempted by recompute (its KV freed) back into `waiting`."""

    @abstractmethod
    def select_victim(self, candidates: Sequence[Request]) -> Request:
        """Pick the resident request to evict. `candidates` (never empty) are resident requests not
        scheduled yet in this step that rank below the one needing blocks (or are that one)."""

    def order_waiting(self, waiting: list[Request]) -> None:
        """Reorder `waiting` in place before admission (default: keep the insertion order)."""

    def order_running(self, running: list[Request]) -> None:
        """Reorder `running` in place before the step's token grants (default: keep the order)."""

    def rank(self, running: list[Request], swapped: list[Request], waiting: list[Request],
             now: float) -> list[Request]:
        """Every unfinished request, highest priority first; called once at the start of each step
        (after `order_running` / `order_waiting`), so it may first update time-dependent state such
        as starvation promotions. Default: running, then swapped, then waiting, each in list order."""
        return [*running, *swapped, *waiting]

    def on_scheduled(self, request: Request, num_new_tokens: int) -> None:
        """Told once per scheduled request per step (default: nothing)."""

    def on_step_done(self, requests: Sequence[Request], step_time_s: float, now: float) -> None:
        """Told after each step: the requests it served and its duration on the scheduler's clock
        (from `schedule()` to `update()`). Requests finished meanwhile may be among them."""

    def on_finished(self, request: Request) -> None:
        """Told once when a request finishes or is aborted: drop any state kept for it."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: earlier arrivals get tokens first and are preempted last."""

    name = "fcfs"

    def add_waiting(self, waiting: list[Request], request: Request) -> None:
        # Usually an append; a request with an older arrival time goes before newer ones.
        bisect.insort_right(waiting, request, key=lambda r: r.arrival_time)

    def add_preempted(self, waiting: list[Request], request: Request) -> None:
        # Victims are the latest arrivals among the running, which all arrived before anything
        # still waiting, so the front keeps arrival order.
        waiting.insert(0, request)

    def select_victim(self, candidates: Sequence[Request]) -> Request:
        assert candidates, "no preemption candidates"
        _, _, victim = max((request.arrival_time, index, request) for index, request in enumerate(candidates))
        return victim

    def order_running(self, running: list[Request]) -> None:
        running.sort(key=lambda r: r.arrival_time)  # stable; O(n) when already sorted

    def rank(self, running: list[Request], swapped: list[Request], waiting: list[Request],
             now: float) -> list[Request]:
        return [*running, *sorted(swapped, key=lambda r: r.arrival_time), *waiting]


class PriorityPolicy(SchedulingPolicy):
    """A policy defined by a sort key (smaller = higher priority): the ranking is all unfinished
    requests sorted by it, and the victim is the request with the largest key."""

    @abstractmethod
    def sort_key(self, request: Request) -> tuple:
        """Total order; must end with a unique tie-breaker (the request id)."""

    def add_waiting(self, waiting: list[Request], request: Request) -> None:
        waiting.append(request)

    def add_preempted(self, waiting: list[Request], request: Request) -> None:
        waiting.append(request)

    def select_victim(self, candidates: Sequence[Request]) -> Request:
        assert candidates, "no preemption candidates"
        return max(candidates, key=self.sort_key)

    def order_running(self, running: list[Request]) -> None:
        running.sort(key=self.sort_key)

    def order_waiting(self, waiting: list[Request]) -> None:
        waiting.sort(key=self.sort_key)

    def rank(self, running: list[Request], swapped: list[Request], waiting: list[Request],
             now: float) -> list[Request]:
        return sorted([*running, *swapped, *waiting], key=self.sort_key)


class SJFOraclePolicy(PriorityPolicy):
    """Shortest remaining job first, re-ranked every step, from an oracle of the output length.

    The oracle is `Request.oracle_output_len` (the true number of output tokens, which only a
    benchmark replaying a trace knows); without it the request's `max_tokens` bound is used. The
    remaining work is counted in iterations: remaining output tokens, plus the prompt's remaining
    prefill expressed in single-token iterations when a prefill profile is given. Preemptive at
    iteration level, it approximates SRPT: the mean-JCT upper-bound baseline for the benchmark.
    """

    name = "sjf-oracle"

    def __init__(self, *, prefill_profile: PrefillProfile | str | None = None):
        self.prefill_profile = _as_profile(prefill_profile)

    def remaining_iterations(self, request: Request) -> float:
        total_output = request.oracle_output_len
        if total_output is None:
            total_output = request.max_output_tokens
        remaining = max(0, total_output - request.num_output_tokens)
        remaining_prompt = max(0, request.num_prompt_tokens - request.num_computed_tokens)
        if self.prefill_profile is not None and remaining_prompt:
            return remaining + self.prefill_profile.time_s(remaining_prompt) / self.prefill_profile.min_iteration_s
        return float(remaining)

    def sort_key(self, request: Request) -> tuple:
        return (self.remaining_iterations(request), request.arrival_time, request.request_id)


# ---- construction ------------------------------------------------------------------------------

def _as_profile(value: PrefillProfile | str | None) -> PrefillProfile | None:
    if value is None or isinstance(value, PrefillProfile):
        return value
    if isinstance(value, str):
        return PrefillProfile.load(value)
    raise ConfigError(f"prefill_profile must be a PrefillProfile or a JSON path, got {type(value).__name__}")


def positive_seconds(name: str, value, allow_none: bool = True, allow_inf: bool = False) -> float | None:
    """Validate an option in seconds: a positive finite number (or None / inf where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return float(value)


def _policy_classes() -> dict[str, type[SchedulingPolicy]]:
    from frugal.core.mlfq import MLFQPolicy, SkipJoinMLFQPolicy

    return {cls.name: cls for cls in (FCFSPolicy, MLFQPolicy, SkipJoinMLFQPolicy, SJFOraclePolicy)}


def policy_names() -> list[str]:
    return sorted(_policy_classes())


def policy_class(name: str) -> type[SchedulingPolicy]:
    """The class registered under `name`; raises ConfigError (a ValueError) naming unknown names."""
    cls = _policy_classes().get(name)
    if cls is None:
        raise ConfigError(f"unknown scheduling policy {name!r}; known: {', '.join(policy_names())}")
    return cls


def policy_option_names(name: str) -> list[str]:
    """The keyword options `make_policy(name, ...)` accepts."""
    parameters = inspect.signature(policy_class(name).__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def make_policy(name: str, **options) -> SchedulingPolicy:
    """Build a policy by name. Unknown names, unknown options and bad option values raise
    ConfigError (a ValueError) naming them."""
    cls = policy_class(name)
    known = policy_option_names(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"scheduling policy {name!r} has no option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(known) or 'none'}")
    return cls(**options)
