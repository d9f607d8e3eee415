"""Replay a request trace through the real engine, in process (no HTTP): the ground truth the
simulator is validated against, and the real-engine policy comparison.

Each trace request is added to the EngineCore once the replay's clock passes its arrival time, with
that arrival time (so queueing behind a step in progress counts), a synthetic prompt of its length,
greedy sampling, `ignore_eos` and `max_tokens` = its output length (so it generates exactly that
many tokens) and, for the sjf-oracle policy, `oracle_output_len` = the same number. The clock is a
`SkippingClock`: wall time, except that when the engine is idle it jumps to the next arrival
instead of sleeping; its source is wall time or this process's CPU time (see `frugal.sim.clock`).
Every step's duration (on that clock) and features are recorded for the step-time model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from frugal.bench.trace import TraceRequest
from frugal.config import EngineConfig
from frugal.engine.engine_core import EngineCore
from frugal.errors import FrugalError
from frugal.sampling_params import SamplingParams
from frugal.sim.clock import SkippingClock
from frugal.sim.metrics import RequestRecord
from frugal.sim.step_time import step_features

logger = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    step_samples: list[tuple[list[float], float]] = field(default_factory=list)  # (features, seconds)
    wall_s: float = 0.0          # real time the replay took
    skipped_s: float = 0.0       # idle time jumped over
    num_steps: int = 0


def make_engine(config: EngineConfig, clock_source: str = "wall") -> tuple[EngineCore, SkippingClock]:
    clock = SkippingClock(clock_source)
    return EngineCore(config, clock=clock), clock


def replay(engine: EngineCore, clock: SkippingClock, requests: list[TraceRequest], prompts: list[list[int]],
           timeout_s: float | None = None) -> ReplayResult:
    """Run `requests` (sorted by arrival) with `prompts` through `engine`, whose clock is `clock`."""
    assert len(requests) == len(prompts)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    scheduler = engine.scheduler
    result = ReplayResult(records=[])
    start_wall = time.perf_counter()
    origin = clock()
    next_index = 0
    while next_index < len(order) or engine.has_unfinished_requests():
        now = clock() - origin
        while next_index < len(order) and requests[order[next_index]].arrival_s <= now:
            index = order[next_index]
            request = requests[index]
            params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
            engine.add_request(f"r{index}", prompts[index], params, arrival_time=origin + request.arrival_s,
                               oracle_output_len=request.output_len)
            next_index += 1
        if not engine.has_unfinished_requests():
            clock.skip_to(origin + requests[order[next_index]].arrival_s)
            continue
        num_unfinished = len(scheduler.requests)
        step_start = clock.elapsed()
        deltas = engine.step()
        step_seconds = clock.elapsed() - step_start
        result.num_steps += 1
        output = scheduler.last_output
        if output is not None and output.scheduled:
            result.step_samples.append((step_features(output, num_unfinished), step_seconds))
        for delta in deltas:
            if delta.finish_reason is None:
                continue
            metrics = delta.metrics
            index = int(delta.request_id[1:])
            if metrics.num_output_tokens != requests[index].output_len:
                raise FrugalError(f"request {delta.request_id} generated {metrics.num_output_tokens} tokens, "
                                  f"expected {requests[index].output_len} ({delta.finish_reason})")
            result.records.append(RequestRecord(
                request_id=delta.request_id, arrival_s=metrics.arrival_time - origin,
                first_token_s=metrics.first_token_time - origin, finished_s=metrics.finished_time - origin,
                prompt_len=metrics.num_prompt_tokens, output_len=metrics.num_output_tokens,
                num_preemptions=metrics.num_preemptions))
        if timeout_s is not None and time.perf_counter() - start_wall > timeout_s:
            raise FrugalError(f"replay exceeded {timeout_s:.0f}s with {len(scheduler.requests)} requests unfinished")
    result.wall_s = time.perf_counter() - start_wall
    result.skipped_s = clock.skipped_s
    return result


def engine_config_for(base: EngineConfig, policy: str, policy_options: dict | None = None) -> EngineConfig:
    """`base` with another scheduling policy."""
    return replace(base, scheduler=replace(base.scheduler, policy=policy, policy_options=dict(policy_options or {})))
