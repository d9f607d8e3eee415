"""Measure the real engine's step times over a spread of batch shapes, for the step-time model.

A synthetic Poisson workload (prompt and output lengths log-uniform) is replayed through the real
engine at several request rates, from nearly idle to saturated, so the recorded steps span batch
sizes from one request to `max_num_seqs`, pure decode to chunked prefill. Each step's features and
measured duration become a sample (see `frugal.sim.step_time`).
"""

from __future__ import annotations

import logging
import random

from frugal.bench.trace import synthetic_prompt
from frugal.config import EngineConfig
from frugal.sim.replay import make_engine, replay
from frugal.sim.step_time import StepTimeModel
from frugal.sim.workload import poisson_workload

logger = logging.getLogger(__name__)


def measure_step_samples(config: EngineConfig, rates_per_s: list[float], num_requests: int = 80,
                         seed: int = 0, clock_source: str = "wall") -> list[tuple[list[float], float]]:
    engine, clock = make_engine(config, clock_source)
    vocab_size = engine.arch.vocab_size
    samples: list[tuple[list[float], float]] = []
    for index, rate in enumerate(rates_per_s):
        requests = poisson_workload(num_requests, rate, engine.max_model_len, seed=seed + index)
        rng = random.Random(seed + index)
        prompts = [synthetic_prompt(r.prompt_len, vocab_size, rng) for r in requests]
        result = replay(engine, clock, requests, prompts)
        samples.extend(result.step_samples)
        logger.info("step profile at %.1f req/s: %d steps", rate, len(result.step_samples))
    return samples


def measure_step_time_model(config: EngineConfig, rates_per_s: list[float], num_requests: int = 80,
                            seed: int = 0, clock_source: str = "wall", metadata: dict | None = None) -> StepTimeModel:
    samples = measure_step_samples(config, rates_per_s, num_requests, seed, clock_source)
    return StepTimeModel.fit(samples, {"rates_per_s": rates_per_s, "num_requests_per_rate": num_requests,
                                       "clock": clock_source, **(metadata or {})})
