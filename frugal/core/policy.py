"""Scheduling policies: the order in which requests get tokens, and who gives way when KV runs out.

The scheduler owns two plain lists, `waiting` (new and preempted requests) and `running`; a policy
decides where requests enter `waiting`, may reorder either list at the start of each step, picks the
preemption victim, and hears how many tokens each request was granted (for time-slicing policies
such as FastServe's skip-join MLFQ, whose queue level lives in `Request.queue_level`).

Always true: a policy only reorders or inserts into the lists it is handed; it never drops a request
and never touches KV blocks.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from frugal.errors import ConfigError
from frugal.request import Request


class SchedulingPolicy(ABC):
    name: str = "base"

    @abstractmethod
    def add_waiting(self, waiting: list[Request], request: Request) -> None:
        """Insert a newly arrived request into `waiting`."""

    @abstractmethod
    def add_preempted(self, waiting: list[Request], request: Request) -> None:
        """Insert a request that was just preempted (its KV freed) back into `waiting`."""

    @abstractmethod
    def select_victim(self, candidates: Sequence[Request]) -> Request:
        """Pick the running request to preempt. `candidates` (never empty) are the running requests
        not yet scheduled in this step, the one that needs blocks included."""

    def order_waiting(self, waiting: list[Request]) -> None:
        """Reorder `waiting` in place before admission (default: keep the insertion order)."""

    def order_running(self, running: list[Request]) -> None:
        """Reorder `running` in place before the step's token grants (default: keep the order)."""

    def on_scheduled(self, request: Request, num_new_tokens: int) -> None:
        """Told once per scheduled request per step (default: nothing)."""


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


_POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    FCFSPolicy.name: FCFSPolicy,
}


def make_policy(name: str) -> SchedulingPolicy:
    """Build a policy by name; raises ConfigError (a ValueError) naming unknown names."""
    factory = _POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown scheduling policy {name!r}; known: {', '.join(sorted(_POLICIES))}")
    return factory()
