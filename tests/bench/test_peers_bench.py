"""`frugal bench decode` and `frugal bench peers` on tiny models: the JSON + PNG they write (speed itself is
measured by the benchmarks, never asserted here)."""

from __future__ import annotations

import json

import pytest


def test_bench_decode_writes_json_and_png(stories260k, tmp_path, capsys):
    from frugal.cli.main import main

    code = main(["bench", "decode", str(stories260k), "--quantization", "int4", "--prompt-len", "16", "--gen-len",
                 "6", "--repeats", "1", "--threads", "1", "--out", str(tmp_path), "--name", "d", "--json"])
    assert code == 0
    results = json.loads((tmp_path / "d.json").read_text())
    assert (tmp_path / "d.png").stat().st_size > 0
    row = results["runs"][0]
    assert row["quantization"] == "int4-g32-sym" and row["decode_tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
    assert 0 < row["decode_bytes_per_token"] and 0 < row["roofline_fraction"]
    assert results["bandwidth"]["bandwidth_gb_s"] > 0 and results["command"].startswith("frugal ")


def test_bench_peers_on_a_tiny_model(stories260k, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from frugal.bench.peers import run_peers

    results = run_peers(stories260k, tmp_path / "work", prompt_len=16, gen_len=6, repeats=1, threads=1,
                        command="test", frugal_quants=["bf16", "int4"], llama_types=["F16", "Q4_0"], with_hf=False,
                        install=False, llama_repack=False)
    labels = [row["label"] for row in results["runs"]]
    assert labels == ["frugal bf16", "frugal int4-g32-sym", "llama.cpp F16", "llama.cpp Q4_0"]
    assert set(results["ratios"]) >= {"frugal int4-g32-sym / llama.cpp Q4_0", "frugal bf16 / llama.cpp F16"}
    for row in results["runs"]:
        assert row["decode_tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0 and row["roofline_fraction"] > 0
        assert 0 < row["roofline_fraction_vs_observed"] <= min(row["roofline_fraction"], 1.0) + 1e-9
    assert results["bandwidth"]["best_observed_gb_s"] >= results["bandwidth"]["bandwidth_gb_s"]
    assert "use_extra_bufts=False" in results["llama_cpp_note"]
    # Which llama.cpp ran, and on what: the build's own system info line, the CPU model.
    assert "AVX" in results["llama_cpp_build"]["system_info"] and results["llama_cpp_build"]["version"]
    assert all("llama_cpp_build" not in row for row in results["runs"])
    assert results["machine"]
