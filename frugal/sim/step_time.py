"""Step-time model: the duration of one engine step as a linear function of what it computes.

Features of a step (from its SchedulerOutput, plus the number of unfinished requests, which the
scheduler walks every step):
    1, scheduled requests, scheduled tokens, sampled requests,
    attention query x key pairs (thousands: prefill is quadratic), context tokens read (thousands),
    unfinished requests.
(Swap copies are priced separately, from the measured copy bandwidth.)
Coefficients are fitted by least squares with non-negative weights (a coefficient that would be
negative is dropped and the fit repeated) to (features, seconds) samples measured on the real
engine (`frugal.sim.measure`), after one pass of outlier rejection (residuals beyond 4 median
absolute deviations: steps slowed by other processes on a shared machine).

Always true: `predict` >= the constant term >= 0 and is non-decreasing in every feature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from frugal.core.scheduler_output import SchedulerOutput
from frugal.errors import ConfigError

FEATURE_NAMES = ("const", "num_seqs", "num_tokens", "num_sampled", "attn_pairs_k", "context_tokens_k",
                 "num_unfinished")


def step_features(output: SchedulerOutput, num_unfinished: int) -> list[float]:
    """The FEATURE_NAMES values of one scheduled step."""
    attn_pairs = 0
    context_tokens = 0
    num_sampled = 0
    for scheduled in output.scheduled:
        end = scheduled.start_pos + scheduled.num_new_tokens
        attn_pairs += scheduled.num_new_tokens * end
        context_tokens += end
        num_sampled += scheduled.needs_sample
    return [1.0, float(len(output.scheduled)), float(output.num_scheduled_tokens), float(num_sampled),
            attn_pairs / 1000.0, context_tokens / 1000.0, float(num_unfinished)]


@dataclass(frozen=True)
class StepTimeModel:
    coefficients: tuple[float, ...]            # seconds per unit of each FEATURE_NAMES entry
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(FEATURE_NAMES):
            raise ConfigError(f"a step-time model needs {len(FEATURE_NAMES)} coefficients "
                              f"({', '.join(FEATURE_NAMES)}), got {len(self.coefficients)}")
        if any(not c >= 0 for c in self.coefficients):
            raise ConfigError(f"step-time coefficients must be >= 0, got {self.coefficients}")

    def predict(self, features: list[float]) -> float:
        return float(sum(c * x for c, x in zip(self.coefficients, features)))

    def predict_step(self, output: SchedulerOutput, num_unfinished: int) -> float:
        return self.predict(step_features(output, num_unfinished))

    # ---- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(cls, samples: list[tuple[list[float], float]], metadata: dict | None = None) -> StepTimeModel:
        """Non-negative least squares over (features, seconds) samples, with outlier rejection."""
        if len(samples) < len(FEATURE_NAMES):
            raise ConfigError(f"need at least {len(FEATURE_NAMES)} step samples to fit, got {len(samples)}")
        features = np.asarray([f for f, _ in samples], dtype=np.float64)   # [num_samples, num_features]
        seconds = np.asarray([s for _, s in samples], dtype=np.float64)    # [num_samples]
        coefficients = _nonnegative_lstsq(features, seconds)
        residuals = seconds - features @ coefficients
        mad = float(np.median(np.abs(residuals - np.median(residuals)))) or 1e-12
        keep = np.abs(residuals) <= 4 * 1.4826 * mad
        if keep.sum() >= len(FEATURE_NAMES):
            coefficients = _nonnegative_lstsq(features[keep], seconds[keep])
        predicted = features @ coefficients
        errors = np.abs(predicted - seconds) / np.maximum(seconds, 1e-9)
        stats = {
            "num_samples": int(len(samples)),
            "num_outliers_dropped": int((~keep).sum()),
            "r2": float(1 - ((seconds - predicted) ** 2).sum() / max(((seconds - seconds.mean()) ** 2).sum(), 1e-18)),
            "median_abs_rel_error": float(np.median(errors)),
            "p90_abs_rel_error": float(np.percentile(errors, 90)),
            "total_time_rel_error": float(predicted.sum() / seconds.sum() - 1),
        }
        return cls(tuple(float(c) for c in coefficients), {"fit": stats, **(metadata or {})})

    # ---- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"features": list(FEATURE_NAMES), "coefficients": list(self.coefficients), "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: dict) -> StepTimeModel:
        if not isinstance(data, dict) or data.get("features") != list(FEATURE_NAMES):
            raise ConfigError(f"a step-time model JSON needs 'features' == {list(FEATURE_NAMES)}")
        return cls(tuple(float(c) for c in data["coefficients"]), dict(data.get("metadata") or {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"step-time model {str(path)!r} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"step-time model {str(path)!r} is not valid JSON: {exc}") from exc


def _nonnegative_lstsq(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: drop the most negative feature and refit until
    none is negative (an active-set pass that is exact for the few features used here)."""
    active = list(range(features.shape[1]))
    coefficients = np.zeros(features.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(features[:, active], seconds, rcond=None)
        if (solution >= 0).all():
            coefficients[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coefficients
