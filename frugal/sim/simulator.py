"""Discrete-event simulation of the engine's scheduling: the real Scheduler and policies, a virtual
clock, and a measured step-time model instead of the model runner.

Events are request arrivals and step completions. Each step the real `Scheduler.schedule()` decides
the batch (policy ranking, preemption, swapping); the step lasts `StepTimeModel.predict_step` plus
the synchronous swap copies at the measured bandwidth (prefetches overlap the step); then every
sampling request receives one token (requests generate exactly their trace output length, as in the
real replay with `ignore_eos`). When the engine is idle the clock jumps to the next arrival.

What is modelled and what is not: scheduling, KV blocks, preemption and swapping are the real code;
the forward pass, sampling and detokenisation are replaced by their fitted duration. Prefix caching
is off (the replay's random prompts share no prefix, so the real engine finds no hits either).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from frugal.bench.trace import TraceRequest
from frugal.config import SchedulerConfig
from frugal.core.policy import make_policy, policy_option_names
from frugal.core.prefill_profile import PrefillProfile
from frugal.core.scheduler import Scheduler
from frugal.core.scheduler_output import RunnerOutput
from frugal.core.swap import SwapCostModel
from frugal.errors import FrugalError
from frugal.request import Request
from frugal.sampling_params import SamplingParams
from frugal.sim.clock import VirtualClock
from frugal.sim.metrics import RequestRecord
from frugal.sim.step_time import StepTimeModel, step_features

logger = logging.getLogger(__name__)

SAMPLED_TOKEN_ID = 3  # any id: requests ignore EOS and stop at their output length


@dataclass(frozen=True)
class SimConfig:
    """The engine's scheduling configuration, as the real engine resolved it."""

    scheduler: SchedulerConfig          # max_model_len resolved
    block_size: int
    num_blocks: int
    num_swap_blocks: int = 0
    swap_cost_model: SwapCostModel | None = None
    prefill_profile: PrefillProfile | None = None   # handed to policies that take one

    def make_scheduler(self, clock: VirtualClock) -> Scheduler:
        options = dict(self.scheduler.policy_options)
        if self.prefill_profile is not None and "prefill_profile" in policy_option_names(self.scheduler.policy):
            options.setdefault("prefill_profile", self.prefill_profile)
        policy = make_policy(self.scheduler.policy, **options)
        return Scheduler(self.scheduler, self.block_size, self.num_blocks, False, policy,
                         num_swap_blocks=self.num_swap_blocks, swap_cost_model=self.swap_cost_model, clock=clock)


def sim_config_from_engine(engine) -> SimConfig:
    """The scheduling configuration of a built EngineCore (to simulate what it would do)."""
    scheduler = engine.scheduler
    return SimConfig(scheduler=scheduler.config, block_size=scheduler.block_size,
                     num_blocks=scheduler.kv_cache_manager.num_blocks, num_swap_blocks=scheduler.swap.pool.num_blocks,
                     swap_cost_model=scheduler.swap.cost_model,
                     prefill_profile=getattr(scheduler.policy, "prefill_profile", None))


@dataclass
class SimResult:
    records: list[RequestRecord]
    num_steps: int
    simulated_s: float
    wall_s: float
    max_concurrency: int        # most unfinished requests at once
    scheduler: Scheduler        # in its final state (counters, pools)
    step_features: list[list[float]]  # per step that scheduled something (as the replay records them)


def simulate(requests: list[TraceRequest], config: SimConfig, step_time: StepTimeModel,
             max_steps: int | None = None) -> SimResult:
    clock = VirtualClock()
    scheduler = config.make_scheduler(clock)
    cost_model = config.swap_cost_model
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    records: list[RequestRecord] = []
    all_features: list[list[float]] = []
    start_wall = time.perf_counter()
    next_index = num_steps = max_concurrency = num_idle_steps = 0
    while next_index < len(order) or scheduler.has_unfinished_requests():
        while next_index < len(order) and requests[order[next_index]].arrival_s <= clock.now:
            index = order[next_index]
            trace_request = requests[index]
            params = SamplingParams(temperature=0.0, max_tokens=trace_request.output_len, ignore_eos=True)
            scheduler.add_request(Request(f"r{index}", [SAMPLED_TOKEN_ID] * trace_request.prompt_len, params,
                                          max_model_len=config.scheduler.max_model_len,
                                          arrival_time=trace_request.arrival_s,
                                          oracle_output_len=trace_request.output_len))
            next_index += 1
        if not scheduler.has_unfinished_requests():
            clock.skip_to(requests[order[next_index]].arrival_s)
            continue
        num_unfinished = len(scheduler.requests)
        max_concurrency = max(max_concurrency, num_unfinished)
        output = scheduler.schedule()
        if not (output.scheduled or output.swap_out_blocks or output.swap_in_blocks or output.prefetch_blocks):
            num_idle_steps += 1
            if num_idle_steps > 2:
                raise FrugalError(f"the scheduler made no progress at t={clock.now:.3f}s with "
                                  f"{num_unfinished} requests unfinished")
        else:
            num_idle_steps = 0
        seconds = 0.0
        if output.scheduled:
            features = step_features(output, num_unfinished)
            all_features.append(features)
            seconds = step_time.predict(features)
        if cost_model is not None:
            seconds += cost_model.swap_time_s(len(output.swap_out_blocks) + len(output.swap_in_blocks))
        clock.advance(seconds)
        runner_output = RunnerOutput({s.request_id: [SAMPLED_TOKEN_ID] for s in output.scheduled if s.needs_sample})
        for request in scheduler.update(output, runner_output):
            if request.is_finished:
                records.append(RequestRecord(
                    request_id=request.request_id, arrival_s=request.arrival_time,
                    first_token_s=request.first_token_time, finished_s=request.finished_time,
                    prompt_len=request.num_prompt_tokens, output_len=request.num_output_tokens,
                    num_preemptions=request.num_preemptions))
        num_steps += 1
        if max_steps is not None and num_steps >= max_steps:
            logger.warning("simulation stopped after %d steps with %d requests unfinished", num_steps,
                           len(scheduler.requests))
            break
    return SimResult(records, num_steps, clock.now, time.perf_counter() - start_wall, max_concurrency, scheduler,
                     all_features)
