"""Fitting trace lengths to a small context, and synthetic workloads."""

from __future__ import annotations

import pytest

from frugal.bench.trace import TraceRequest
from frugal.errors import FrugalError
from frugal.sim.workload import clip_to_context, fit_trace, poisson_workload


def test_clip_keeps_what_fits_and_clips_the_rest():
    requests = [TraceRequest(0.0, 100, 20), TraceRequest(1.0, 4000, 10), TraceRequest(2.0, 300, 900),
                TraceRequest(3.0, 600, 300)]
    clipped, record = clip_to_context(requests, max_model_len=512)
    assert [(r.prompt_len, r.output_len) for r in clipped] == [(100, 20), (501, 10), (255, 256), (255, 256)]
    assert all(r.prompt_len + r.output_len <= 511 for r in clipped)
    assert [r.arrival_s for r in clipped] == [0.0, 1.0, 2.0, 3.0]
    assert (record["num_prompts_clipped"], record["num_outputs_clipped"]) == (3, 2)
    assert clip_to_context(requests, 512, max_output_len=16)[0][2].output_len == 16
    with pytest.raises(FrugalError, match="max_output_len"):
        clip_to_context(requests, 512, max_output_len=511)


def test_fit_trace_modes():
    requests = [TraceRequest(0.0, 1000, 5), TraceRequest(1.0, 250, 5)]
    clipped, record = fit_trace(requests, 512, "clip")
    assert record["fit"] == "clip" and record["prompt_len_mean"] == (506 + 250) / 2
    scaled, record = fit_trace(requests, 512, "scale")
    assert record["fit"] == "scale" and [r.prompt_len for r in scaled] == [256, 64]
    with pytest.raises(FrugalError, match="'clip' or 'scale'"):
        fit_trace(requests, 512, "crop")


def test_poisson_workload_fits_the_context():
    requests = poisson_workload(200, rate_per_s=10.0, max_model_len=128, seed=3)
    assert len(requests) == 200 and all(1 <= r.prompt_len and 1 <= r.output_len for r in requests)
    assert all(r.prompt_len + r.output_len <= 127 for r in requests)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 40  # about 200 / 10 s
