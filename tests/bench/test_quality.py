"""`frugal bench quality`: the quantization quality matrix runs end to end on a real model (RTN at
load and GPTQ through a written checkpoint) and reports changes relative to fp32."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import SHARED

from frugal.bench.quality import DEFAULT_CONFIGS, QualityConfig, plot_quality, run_quality

TEST_TEXT = SHARED / "data" / "wikitext2_valid_test" / "test.txt"
VALID_TEXT = SHARED / "data" / "wikitext2_valid_test" / "valid.txt"


def test_quality_matrix_matches_direct_evaluations(stories260k, tmp_path):
    from frugal.eval.perplexity import evaluate_perplexity

    configs = (QualityConfig("fp32"), QualityConfig("int4 g32 sym", bits=4, group_size=32),
               QualityConfig("int4 g32 sym gptq", bits=4, group_size=32, method="gptq"))
    results = run_quality(str(stories260k), TEST_TEXT, VALID_TEXT, configs, max_tokens=600, progress=False)
    rows = {row["config"]: row for row in results["rows"]}
    assert list(rows) == [c.label for c in configs]
    assert rows["fp32"]["vs_fp32"] == 0.0
    direct = evaluate_perplexity(stories260k, TEST_TEXT, quantization="int4", max_tokens=600, progress=False)
    assert math.isclose(rows["int4 g32 sym"]["perplexity"], direct.perplexity, rel_tol=1e-9)
    # Rounding changes the model: neither quantized row may equal fp32 exactly.
    for label in ("int4 g32 sym", "int4 g32 sym gptq"):
        assert rows[label]["perplexity"] != rows["fp32"]["perplexity"]
        assert math.isclose(rows[label]["vs_fp32"], rows[label]["perplexity"] / rows["fp32"]["perplexity"] - 1)
    assert rows["int4 g32 sym gptq"]["quantize_command"].startswith("frugal quantize")
    plot_quality(results, tmp_path / "q.png", "test")
    assert (tmp_path / "q.png").stat().st_size > 0


def test_bench_quality_cli_writes_json_and_png(stories260k, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "frugal.cli.main", "bench", "quality", str(stories260k), "--max-tokens", "300",
         "--out", str(tmp_path), "--name", "q"], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["command"].startswith("frugal bench quality")
    assert len(data["rows"]) == len(DEFAULT_CONFIGS) and (tmp_path / "q.png").is_file()
