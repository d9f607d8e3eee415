"""`frugal bench serve`: trace loading and fitting (pure), and one real replay against a real server."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from frugal.bench.trace import fit_to_context, load_azure_trace, synthetic_prompt
from frugal.errors import FrugalError

AZURE_CODE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "azure_llm_trace_2023" / \
    "AzureLLMInferenceTrace_code.csv"

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.5000000,4000,10
2023-11-16 18:17:04.0000000,1000,600
2023-11-16 18:17:05.5000000,20,3
"""


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(CSV)
    return path


def test_load_azure_trace_relative_arrivals_and_rate_scale(trace_file):
    requests = load_azure_trace(trace_file)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in requests] == \
        [(0.0, 4000, 10), (0.5, 1000, 600), (2.0, 20, 3)]
    doubled = load_azure_trace(trace_file, rate_scale=2.0)
    assert [r.arrival_s for r in doubled] == [0.0, 0.25, 1.0]
    window = load_azure_trace(trace_file, num_requests=1, start=1)
    assert [(r.arrival_s, r.prompt_len) for r in window] == [(0.0, 1000)]


def test_load_azure_trace_rejects_bad_files(tmp_path, trace_file):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,5\n")
    with pytest.raises(FrugalError, match="GeneratedTokens"):
        load_azure_trace(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n")
    with pytest.raises(FrugalError, match="bad.csv:2"):
        load_azure_trace(bad)
    with pytest.raises(FrugalError, match="does not exist"):
        load_azure_trace(tmp_path / "nope.csv")
    with pytest.raises(FrugalError, match="rate scale"):
        load_azure_trace(trace_file, rate_scale=0)


def test_fit_to_context_scales_prompts_and_clips_outputs(trace_file):
    fitted, record = fit_to_context(load_azure_trace(trace_file), max_model_len=512, max_prompt_fraction=0.5)
    scale = 256 / 4000
    assert record["prompt_scale"] == pytest.approx(scale)
    assert [r.prompt_len for r in fitted] == [256, round(1000 * scale), 1]
    assert [r.output_len for r in fitted] == [10, 512 - 1 - round(1000 * scale), 3]
    assert record["num_outputs_clipped"] == 1 and "clipped" in record["note"]
    assert record["trace_prompt_tokens"]["max"] == 4000 and record["prompt_tokens"]["max"] == 256
    assert all(r.prompt_len + r.output_len <= 511 for r in fitted)
    rng = random.Random(0)
    prompt = synthetic_prompt(7, 512, rng)
    assert len(prompt) == 7 and prompt[0] == 1 and all(3 <= t < 512 for t in prompt[1:])


def test_bench_serve_replays_a_trace_slice(stories260k, tmp_path):
    if not AZURE_CODE.is_file():
        pytest.skip(f"{AZURE_CODE} not present")
    result = subprocess.run(
        [sys.executable, "-m", "frugal.cli.main", "bench", "serve", "--model", str(stories260k), "--trace",
         str(AZURE_CODE), "--num-requests", "6", "--rate-scale", "20", "--policy", "fcfs", "--json",
         "--out", str(tmp_path), "--name", "run", "--kv-cache-memory", "16MiB", "--timeout", "120"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert json.loads((tmp_path / "run.json").read_text()) == payload
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert payload["length_adjustment"]["max_model_len"] == 512
    assert payload["length_adjustment"]["prompt_scale"] < 1  # the trace's prompts exceed the context
    (run,) = payload["runs"]
    summary = run["summary"]
    assert run["policy"] == "fcfs" and "--scheduling-policy fcfs" in run["server_command"]
    assert summary["num_completed"] == 6 and summary["num_failed"] == 0
    for stat in ("mean", "p99"):
        assert 0 < summary["ttft_s"][stat] <= summary["e2e_latency_s"]["max"]
        assert summary["e2e_latency_s"][stat] > 0
    for request in run["requests"]:
        assert request["num_tokens"] == request["output_len"] and request["error"] is None
    assert summary["num_output_tokens"] == sum(r["output_len"] for r in run["requests"])
    assert summary["output_throughput_tok_per_s"] > 0
