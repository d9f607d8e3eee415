"""`frugal bench attention`: the decode-attention kernel's two paths timed in one process."""

from __future__ import annotations

import json

import pytest

from frugal.bench.attention import measure_attention
from frugal.cli.main import main
from frugal.quant.kernels import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="frugal's CPU kernels are not available here")


@needs_kernels
def test_measure_attention_times_each_path_per_round_and_restores_the_switch():
    kernels = cpu_kernels()
    enabled = kernels.amx_attention_enabled()
    times = measure_attention(8, 2, 64, 100, threads=1, layers=2, rounds=3, calls_per_round=20)
    assert len(times["avx512_us"]) == 3 and all(t > 0 for t in times["avx512_us"])
    if kernels.amx_attention_available():
        assert len(times["amx_us"]) == 3 and all(t > 0 for t in times["amx_us"])
    else:
        assert times["amx_us"] is None
    assert kernels.amx_attention_enabled() == enabled


@needs_kernels
def test_attention_cli_writes_json_and_png(tmp_path):
    code = main(["bench", "attention", "--shapes", "smollm2-135m", "--contexts", "40", "--layers", "1",
                 "--rounds", "2", "--threads", "1", "--out", str(tmp_path), "--name", "attn"])
    assert code == 0
    result = json.loads((tmp_path / "attn.json").read_text())
    (row,) = result["rows"]
    assert (row["shape"], row["num_heads"], row["num_kv_heads"], row["head_dim"]) == ("smollm2-135m", 9, 3, 64)
    assert row["avx512_median_us"] > 0 and "machine" in result
    assert (tmp_path / "attn.png").stat().st_size > 0
