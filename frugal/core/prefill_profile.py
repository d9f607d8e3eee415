"""PrefillProfile: how long one iteration that prefills an N-token prompt takes on this machine/model.

FastServe's skip-join MLFQ places a new job by its predicted first-iteration time, and the swap
cost model prices preemption-by-recompute as the time to prefill the job's computed tokens again;
both read this profile. It is measured on the real engine (`frugal.engine.profiling`, or
`frugal bench profile-prefill`, which stores it as JSON) and is plain numbers here: core/ never
imports torch.

Always true: `points` are sorted by strictly increasing token count with non-negative times, and
`time_s(n)` is piecewise linear through them, non-decreasing, linear beyond the last point along
the last segment's slope (never negative), and `time_s(0) == 0`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from frugal.errors import ConfigError


@dataclass(frozen=True)
class PrefillProfile:
    points: tuple[tuple[int, float], ...]        # (prompt tokens, seconds of the iteration prefilling them)
    metadata: dict = field(default_factory=dict, compare=False)  # model, device, dtype, command, ...

    def __post_init__(self) -> None:
        points = tuple((int(n), float(t)) for n, t in self.points)
        if not points:
            raise ConfigError("a prefill profile needs at least one (num_tokens, seconds) point")
        for (n0, _), (n1, _) in zip(points, points[1:]):
            if n1 <= n0:
                raise ConfigError(f"prefill profile token counts must strictly increase, got {n0} then {n1}")
        for n, t in points:
            if n <= 0 or not t >= 0.0:
                raise ConfigError(f"prefill profile point ({n}, {t}) needs tokens > 0 and seconds >= 0")
        # Enforce monotonicity (measurement noise can make a longer prompt look faster).
        running_max, monotone = 0.0, []
        for n, t in points:
            running_max = max(running_max, t)
            monotone.append((n, running_max))
        object.__setattr__(self, "points", tuple(monotone))
        object.__setattr__(self, "_tokens", [n for n, _ in monotone])

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[int, float]], metadata: dict | None = None) -> PrefillProfile:
        """Median time per token count from repeated (num_tokens, seconds) measurements."""
        by_tokens: dict[int, list[float]] = {}
        for num_tokens, seconds in samples:
            by_tokens.setdefault(int(num_tokens), []).append(float(seconds))
        points = []
        for num_tokens in sorted(by_tokens):
            times = sorted(by_tokens[num_tokens])
            points.append((num_tokens, times[len(times) // 2]))
        return cls(tuple(points), dict(metadata or {}))

    def time_s(self, num_tokens: int) -> float:
        """Predicted seconds of an iteration that prefills `num_tokens` tokens of one prompt."""
        if num_tokens <= 0:
            return 0.0
        points, tokens = self.points, self._tokens  # type: ignore[attr-defined]
        if len(points) == 1:  # one point: proportional to the prompt length
            n0, t0 = points[0]
            return t0 * num_tokens / n0
        index = bisect.bisect_left(tokens, num_tokens)
        if index < len(points) and tokens[index] == num_tokens:
            return points[index][1]
        if index == 0:  # below the first point: scale down towards (0, 0)
            n0, t0 = points[0]
            return t0 * num_tokens / n0
        if index == len(points):  # beyond the last point: extend the last segment
            (n0, t0), (n1, t1) = points[-2], points[-1]
        else:
            (n0, t0), (n1, t1) = points[index - 1], points[index]
        slope = (t1 - t0) / (n1 - n0)
        return max(0.0, t0 + slope * (num_tokens - n0))

    @property
    def min_iteration_s(self) -> float:
        """The fastest measured iteration (the smallest prompt): FastServe's base quantum."""
        return self.points[0][1]

    # ---- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"points": [[n, t] for n, t in self.points], "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: dict) -> PrefillProfile:
        if not isinstance(data, dict) or "points" not in data:
            raise ConfigError("a prefill profile JSON needs a 'points' list of [num_tokens, seconds]")
        try:
            points = tuple((int(n), float(t)) for n, t in data["points"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad prefill profile points {data['points']!r}: {exc}") from exc
        return cls(points, dict(data.get("metadata") or {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrefillProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"prefill profile {str(path)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"prefill profile {str(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
