"""Step-time model: features of a scheduled step, non-negative least-squares fit, persistence."""

from __future__ import annotations

import random

import pytest

from scheduling_fakes import make_request
from frugal.core.scheduler_output import ScheduledRequest, SchedulerOutput
from frugal.errors import ConfigError
from frugal.sim.step_time import FEATURE_NAMES, StepTimeModel, step_features


def test_step_features_count_what_the_step_computes():
    a, b = make_request("a", range(10)), make_request("b", range(40))
    output = SchedulerOutput(scheduled=[
        ScheduledRequest(a, start_pos=0, num_new_tokens=10, token_ids=list(range(10)), block_ids=[0, 1, 2]),
        ScheduledRequest(b, start_pos=39, num_new_tokens=1, token_ids=[7], block_ids=[3, 4, 5], needs_sample=False),
    ], num_scheduled_tokens=11)
    features = dict(zip(FEATURE_NAMES, step_features(output, num_unfinished=5)))
    assert features == {"const": 1.0, "num_seqs": 2.0, "num_tokens": 11.0, "num_sampled": 1.0,
                        "attn_pairs_k": (10 * 10 + 1 * 40) / 1000, "context_tokens_k": (10 + 40) / 1000,
                        "num_unfinished": 5.0}


def synthetic_samples(truth: list[float], count: int, noise: float, seed: int = 0) -> list[tuple[list[float], float]]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        seqs = rng.randint(1, 32)
        features = [1.0, seqs, seqs + rng.randint(0, 500), rng.randint(0, seqs), rng.uniform(0, 200), rng.uniform(0, 20),
                    seqs + rng.randint(0, 100)]
        seconds = sum(c * x for c, x in zip(truth, features))
        samples.append((features, seconds * (1 + rng.uniform(-noise, noise))))
    return samples


def test_fit_recovers_known_coefficients_and_ignores_outliers():
    truth = [1e-3, 2e-4, 3e-5, 0.0, 5e-5, 4e-4, 1e-5]
    samples = synthetic_samples(truth, 400, noise=0.01)
    rng = random.Random(1)
    for index in rng.sample(range(len(samples)), 12):  # steps slowed down by other processes
        features, seconds = samples[index]
        samples[index] = (features, seconds * 10)
    model = StepTimeModel.fit(samples, {"note": "synthetic"})
    assert all(c >= 0 for c in model.coefficients)
    for fitted, true in zip(model.coefficients, truth):
        assert fitted == pytest.approx(true, rel=0.15, abs=2e-5)
    fit = model.metadata["fit"]
    assert fit["num_outliers_dropped"] >= 12 and fit["median_abs_rel_error"] < 0.02
    assert model.metadata["note"] == "synthetic"
    features, seconds = synthetic_samples(truth, 1, noise=0.0, seed=7)[0]
    assert model.predict(features) == pytest.approx(seconds, rel=0.05)


def test_fit_never_returns_a_negative_coefficient():
    # seconds fall with num_sampled in these samples: least squares would give it a negative weight.
    rng = random.Random(0)
    samples = []
    for _ in range(100):
        seqs, sampled = rng.randint(1, 32), rng.randint(0, 32)
        samples.append(([1.0, seqs, 0.0, sampled, 0.0, 0.0, 0.0], 0.001 + 0.0002 * seqs - 0.00001 * sampled))
    model = StepTimeModel.fit(samples)
    assert all(c >= 0 for c in model.coefficients) and model.coefficients[3] == 0.0
    assert model.coefficients[1] > 0


def test_save_load_and_errors(tmp_path):
    model = StepTimeModel((1e-3, 1e-4, 0.0, 0.0, 1e-5, 0.0, 2e-6), {"command": "x"})
    path = model.save(tmp_path / "m.json")
    assert StepTimeModel.load(path) == model and StepTimeModel.load(path).metadata == {"command": "x"}
    with pytest.raises(ConfigError, match="coefficients must be >= 0"):
        StepTimeModel((-1.0,) + (0.0,) * 6)
    with pytest.raises(ConfigError, match="needs 7 coefficients"):
        StepTimeModel((1.0,))
    with pytest.raises(ConfigError, match="at least 7 step samples"):
        StepTimeModel.fit([([1.0] * 7, 1.0)])
    (tmp_path / "bad.json").write_text('{"features": ["const"], "coefficients": [1.0]}')
    with pytest.raises(ConfigError, match="'features'"):
        StepTimeModel.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        StepTimeModel.load(tmp_path / "missing.json")
