"""Scheduling options on the command line, and `frugal bench policies | simulate` end to end on a
small trace (real subprocesses, the real stories260K)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from frugal.cli.policy_args import parse_policy_options
from frugal.core.prefill_profile import PrefillProfile
from frugal.errors import ConfigError
from frugal.sim.step_time import StepTimeModel


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_parse_policy_options():
    assert parse_policy_options(["quantum_s=0.01", "num_levels=4", "starvation_s=inf", "prefill_profile=p.json",
                                 "x = true"]) == {"quantum_s": 0.01, "num_levels": 4, "starvation_s": float("inf"),
                                                  "prefill_profile": "p.json", "x": "true"}
    with pytest.raises(ConfigError, match="KEY=VALUE, got 'quantum_s'"):
        parse_policy_options(["quantum_s"])


def test_generate_with_a_scheduling_policy_and_swap_space(stories260k, tmp_path):
    result = run_cli("generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "8",
                     "--temperature", "0", "--json", "--scheduling-policy", "mlfq", "--policy-option",
                     "quantum_s=0.01", "--swap-space", "1MiB", "--swap-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 8
    bad = run_cli("generate", "x", "--model", str(stories260k), "--scheduling-policy", "mlfq",
                  "--policy-option", "quantum_s=-2")
    assert bad.returncode == 2 and "quantum_s must be a positive number of seconds, got -2" in bad.stderr


@pytest.fixture()
def bench_inputs(tmp_path):
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for index in range(10):
        rows.append(f"2023-11-16 18:17:{index // 4:02d}.{index * 7 % 10}000000,{40 + 90 * index},{2 + index % 5}")
    trace.write_text("\n".join(rows) + "\n")
    profile = PrefillProfile(((1, 0.001), (64, 0.003), (511, 0.03))).save(tmp_path / "profile.json")
    step = StepTimeModel((0.001, 0.0002, 2e-5, 0.0, 5e-5, 5e-4, 1e-5)).save(tmp_path / "step.json")
    return trace, profile, step


def test_bench_policies_writes_real_and_simulated_results(stories260k, tmp_path, bench_inputs):
    trace, profile, step = bench_inputs
    result = run_cli("bench", "policies", "--model", str(stories260k), "--trace", str(trace), "--num-requests", "10",
                     "--rate-scales", "4", "--policies", "fcfs", "skip-join-mlfq", "--prefill-profile", str(profile),
                     "--step-time", str(step), "--max-num-seqs", "4", "--out-dir", str(tmp_path), "--name", "p")
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "p.png").stat().st_size > 0
    assert payload["command"].startswith("frugal bench policies") and payload["clock"] == "cpu"
    assert [(r["policy"], r["rate_scale"]) for r in payload["runs"]] == [("fcfs", 4.0), ("skip-join-mlfq", 4.0)]
    for run in payload["runs"]:
        assert run["real"]["num_requests"] == run["sim"]["num_requests"] == 10
        assert set(run["sim_rel_error"]) == {"jct_s.mean", "jct_s.p99", "ttft_s.mean", "ttft_s.p99"}
    assert payload["ratios_vs_fcfs"]["4.0"]["fcfs"]["mean_jct_vs_fcfs"] == 1.0
    assert payload["trace"]["fit"] == "clip" and payload["trace"]["num_requests"] == 10


def test_bench_simulate_writes_jct_against_load(stories260k, tmp_path, bench_inputs):
    trace, profile, step = bench_inputs
    result = run_cli("bench", "simulate", "--model", str(stories260k), "--trace", str(trace), "--num-requests", "10",
                     "--rate-scales", "1", "8", "--policies", "fcfs", "sjf-oracle", "--prefill-profile", str(profile),
                     "--step-time", str(step), "--max-num-seqs", "2", "--num-kv-blocks", "64",
                     "--out-dir", str(tmp_path), "--name", "s")
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "s.json").read_text())
    assert len(payload["runs"]) == 4 and payload["scheduler"]["num_blocks"] == 64
    assert all(run["sim"]["num_requests"] == 10 for run in payload["runs"])
    bad = run_cli("bench", "simulate", "--model", str(stories260k), "--trace", str(trace), "--rate-scales", "0",
                  "--prefill-profile", str(profile), "--step-time", str(step))
    assert bad.returncode == 2 and "--rate-scales must be positive" in bad.stderr
