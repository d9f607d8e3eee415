"""Clocks for trace replay: the scheduler, the engine and the replay loop share one.

- `SkippingClock`: a time source (wall time, `time.perf_counter`, or this process's CPU time,
  `time.process_time`) plus the idle gaps the replay skipped, so a replay measures real step times
  without sleeping until the next arrival. The CPU-time source makes a replay on a machine shared
  with other work read like one on a dedicated core (run torch with one intra-op thread then).
- `VirtualClock`: advanced by hand (the simulator adds each step's modelled duration).

Both are monotonic: `skip_to` / `advance` never move time backwards.
"""

from __future__ import annotations

import time


CLOCK_SOURCES = {"wall": time.perf_counter, "cpu": time.process_time}


class SkippingClock:
    def __init__(self, source: str = "wall") -> None:
        assert source in CLOCK_SOURCES, source
        self.source = source
        self._now = CLOCK_SOURCES[source]
        self._offset = 0.0
        self.skipped_s = 0.0

    def __call__(self) -> float:
        return self._now() + self._offset

    def elapsed(self) -> float:
        """The raw source, for timing one step in the same units as the clock."""
        return self._now()

    def skip_to(self, when: float) -> None:
        """Jump forward to `when` (nothing happens if it is already past)."""
        gap = when - self()
        if gap > 0:
            self._offset += gap
            self.skipped_s += gap


class VirtualClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.now += seconds

    def skip_to(self, when: float) -> None:
        self.now = max(self.now, when)
