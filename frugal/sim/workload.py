"""Workloads for replay and simulation: the Azure LLM trace fitted to a small model's context, and
synthetic Poisson workloads for measuring step times.

`clip_to_context` (the default here) keeps each trace request's lengths where they fit and clips
them where they do not: output to `max_output_len`, then the prompt to the room left, so
prompt + output <= max_model_len - 1. `frugal.bench.trace.fit_to_context` (the serving benchmark's
default) scales every prompt instead; `fit_trace` offers both.
"""

from __future__ import annotations

import random

from frugal.bench.trace import TraceRequest, fit_to_context
from frugal.errors import FrugalError


def clip_to_context(requests: list[TraceRequest], max_model_len: int,
                    max_output_len: int | None = None) -> tuple[list[TraceRequest], dict]:
    """Clip output lengths to `max_output_len` (default: half the context), then prompt lengths so
    that prompt + output <= max_model_len - 1. Returns the clipped requests and a record."""
    max_output_len = max_output_len or max_model_len // 2
    if not 1 <= max_output_len <= max_model_len - 2:
        raise FrugalError(f"max_output_len must be in [1, {max_model_len - 2}], got {max_output_len}")
    clipped, num_prompts, num_outputs = [], 0, 0
    for request in requests:
        output_len = min(request.output_len, max_output_len)
        prompt_len = min(request.prompt_len, max_model_len - 1 - output_len)
        num_outputs += output_len < request.output_len
        num_prompts += prompt_len < request.prompt_len
        clipped.append(TraceRequest(request.arrival_s, prompt_len, output_len))
    record = {"fit": "clip", "max_model_len": max_model_len, "max_output_len": max_output_len,
              "num_prompts_clipped": num_prompts, "num_outputs_clipped": num_outputs,
              "note": (f"outputs clipped to {max_output_len} tokens, then prompts to the room left in the "
                       f"{max_model_len}-token context: {num_prompts} prompts and {num_outputs} outputs clipped")}
    return clipped, record


def fit_trace(requests: list[TraceRequest], max_model_len: int, mode: str = "clip") -> tuple[list[TraceRequest], dict]:
    if mode == "clip":
        fitted, record = clip_to_context(requests, max_model_len)
    elif mode == "scale":
        fitted, record = fit_to_context(requests, max_model_len)
        record = {"fit": "scale", **record}
    else:
        raise FrugalError(f"trace fit must be 'clip' or 'scale', got {mode!r}")
    record["prompt_len_mean"] = sum(r.prompt_len for r in fitted) / len(fitted)
    record["output_len_mean"] = sum(r.output_len for r in fitted) / len(fitted)
    return fitted, record


def poisson_workload(num_requests: int, rate_per_s: float, max_model_len: int, seed: int = 0,
                     max_output_len: int = 128) -> list[TraceRequest]:
    """Poisson arrivals with prompt and output lengths uniform on a log scale (for step profiling)."""
    rng = random.Random(seed)
    requests, now = [], 0.0
    for _ in range(num_requests):
        now += rng.expovariate(rate_per_s)
        output_len = min(max_output_len, int(2 ** rng.uniform(0, 7)))
        prompt_len = min(max_model_len - 1 - output_len, int(2 ** rng.uniform(2, 9)))
        requests.append(TraceRequest(now, max(1, prompt_len), max(1, output_len)))
    return requests
