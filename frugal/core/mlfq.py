"""Multi-level feedback queue at iteration granularity, and FastServe's skip-join variant.

FastServe (Wu et al. 2023, "Fast Distributed Inference Serving for Large Language Models"):
- queue i (0 = highest priority) has quantum `quantum_s * 2**i`; every step the scheduler serves the
  best-ranked jobs (lowest level first, first-in-first-out within a level), so a running job can be
  preempted between any two iterations;
- each served job is charged the step's duration; a job that used up its level's quantum drops one
  level (and queues behind the jobs already there);
- skip-join: a new job does not start at level 0 but at the first level whose quantum covers its
  predicted first-iteration (prefill) time, read from a `PrefillProfile` measured on the machine,
  so a long prompt does not bounce down through every level;
- starvation prevention: a job not served for longer than `starvation_s` returns to level 0.

Always true: every request the policy has seen and that has not finished has exactly one state;
`0 <= level < num_levels`; `request.queue_level` mirrors the level (for observers and tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from frugal.core.policy import PriorityPolicy, _as_profile, positive_seconds
from frugal.core.prefill_profile import PrefillProfile
from frugal.errors import ConfigError
from frugal.request import Request

logger = logging.getLogger(__name__)

# Default starvation bound, in units of the lowest level's quantum.
DEFAULT_STARVATION_QUANTA = 8


@dataclass
class JobState:
    level: int
    attained_s: float        # service received at the current level
    entered_at: float        # when it joined the current level (FIFO order within a level)
    last_served_at: float    # end of its last served step, or its arrival (the starvation clock)


class MLFQPolicy(PriorityPolicy):
    """Plain MLFQ: every job joins level 0."""

    name = "mlfq"

    def __init__(self, *, quantum_s: float | None = None, num_levels: int = 8, starvation_s: float | None = None,
                 prefill_profile: PrefillProfile | str | None = None):
        self.prefill_profile = _as_profile(prefill_profile)
        base_quantum_s = positive_seconds("quantum_s", quantum_s)
        if base_quantum_s is None:
            if self.prefill_profile is None or self.prefill_profile.min_iteration_s <= 0:
                raise ConfigError(f"scheduling policy {self.name!r} needs quantum_s or a prefill profile "
                                  f"(its fastest iteration is the default quantum)")
            base_quantum_s = self.prefill_profile.min_iteration_s
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or not 1 <= num_levels <= 32:
            raise ConfigError(f"num_levels must be an integer in [1, 32], got {num_levels!r}")
        self.base_quantum_s = base_quantum_s
        self.num_levels = num_levels
        default_starvation = DEFAULT_STARVATION_QUANTA * self.quantum_s(num_levels - 1)
        self.starvation_s = positive_seconds("starvation_s", starvation_s, allow_inf=True) or default_starvation
        self._states: dict[str, JobState] = {}
        self.num_demotions = 0
        self.num_promotions = 0

    @classmethod
    def needs_prefill_profile(cls, options: dict) -> bool:
        return options.get("quantum_s") is None

    def quantum_s(self, level: int) -> float:
        return self.base_quantum_s * 2 ** level

    def join_level(self, request: Request) -> int:
        """The level a new job starts at."""
        return 0

    def state(self, request: Request) -> JobState:
        state = self._states.get(request.request_id)
        if state is None:
            level = self.join_level(request)
            state = JobState(level, 0.0, request.arrival_time, request.arrival_time)
            self._states[request.request_id] = state
            request.queue_level = level
        return state

    # ---- the PriorityPolicy seam -----------------------------------------------------------------

    def add_waiting(self, waiting: list[Request], request: Request) -> None:
        self.state(request)
        waiting.append(request)

    def sort_key(self, request: Request) -> tuple:
        state = self.state(request)
        return (state.level, state.entered_at, request.arrival_time, request.request_id)

    def rank(self, running: list[Request], swapped: list[Request], waiting: list[Request],
             now: float) -> list[Request]:
        requests = [*running, *swapped, *waiting]
        for request in requests:
            state = self.state(request)
            if state.level > 0 and now - state.last_served_at > self.starvation_s:
                logger.debug("promoting starved %s from level %d", request.request_id, state.level)
                self._move(request, state, 0, now)
                state.last_served_at = now
                self.num_promotions += 1
        requests.sort(key=self.sort_key)
        return requests

    def on_step_done(self, requests: Sequence[Request], step_time_s: float, now: float) -> None:
        for request in requests:
            state = self._states.get(request.request_id)
            if state is None or request.is_finished:
                continue
            state.attained_s += step_time_s
            state.last_served_at = now
            if state.attained_s >= self.quantum_s(state.level) and state.level < self.num_levels - 1:
                self._move(request, state, state.level + 1, now)
                self.num_demotions += 1

    def on_finished(self, request: Request) -> None:
        self._states.pop(request.request_id, None)

    def _move(self, request: Request, state: JobState, level: int, now: float) -> None:
        state.level = level
        state.attained_s = 0.0
        state.entered_at = now
        request.queue_level = level


class SkipJoinMLFQPolicy(MLFQPolicy):
    """FastServe's skip-join MLFQ: a job joins the first level whose quantum covers its predicted
    prefill time."""

    name = "skip-join-mlfq"
    requires_prefill_profile = True

    def __init__(self, *, quantum_s: float | None = None, num_levels: int = 8, starvation_s: float | None = None,
                 prefill_profile: PrefillProfile | str | None = None):
        if prefill_profile is None:
            raise ConfigError("scheduling policy 'skip-join-mlfq' needs a prefill profile (prefill time vs "
                              "prompt length measured on this machine); measure one with "
                              "`frugal bench profile-prefill` or let the engine measure it at startup")
        super().__init__(quantum_s=quantum_s, num_levels=num_levels, starvation_s=starvation_s,
                         prefill_profile=prefill_profile)

    @classmethod
    def needs_prefill_profile(cls, options: dict) -> bool:
        return True

    def join_level(self, request: Request) -> int:
        assert self.prefill_profile is not None
        predicted_s = self.prefill_profile.time_s(request.num_prompt_tokens)
        for level in range(self.num_levels):
            if self.quantum_s(level) >= predicted_s:
                return level
        return self.num_levels - 1
