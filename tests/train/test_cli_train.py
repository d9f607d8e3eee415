"""`frugal train tokenizer | lm | eval` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2_valid_test"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal.cli.main", "train", *args], capture_output=True, text=True,
                          timeout=600)


def test_tokenizer_then_lm_then_resume_then_eval(tmp_path, corpus_dir):
    if not (WIKITEXT / "test.txt").is_file():
        pytest.skip("WikiText-2 not present")
    result = run_cli("tokenizer", "--data", str(corpus_dir), "--vocab-size", "400", "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
[model]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 32
[data]
files = ["{corpus_dir}"]
tokenizer = "tok"
seq_len = 32
val_every = 8
val_block_tokens = 256
[optim]
max_steps = 4
batch_size = 2
log_every = 1
eval_every = 2
eval_batches = 1
checkpoint_every = 2
""")
    out = tmp_path / "model"
    common = ("--out", str(out), "--threads", "1", "--cache-dir", str(tmp_path / "cache"))
    result = run_cli("lm", "--config", str(config), *common, "--stop-at-step", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 2 and "step 2/4" in result.stderr

    result = run_cli("lm", "--config", str(config), *common)
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr

    result = run_cli("lm", "--config", str(config), *common, "--resume")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 4 and summary["tokens_seen"] == 4 * 2 * 32 and summary["val_loss"] > 0

    result = run_cli("eval", str(out), "--target", str(out), "--max-eval-tokens", "300", "--threads", "1",
                     "--write-card")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["wikitext2_test"]["tokens"] <= 300 and report["wikitext2_test"]["word_perplexity"] > 1
    assert report["agreement_with_target"]["teacher_forced_wikitext2_valid"]["agreement"] == 1.0
    assert len(report["samples"]) == 4
    card = (out / "README.md").read_text()
    assert "WikiText-2 test perplexity" in card and f"{summary['tokens_seen']:,}" in card
    assert json.loads((out / "card.json").read_text())["parameters"] == summary["parameters"]
    assert report["heldout_validation"]["tokens"] > 0 and "whole held-out split" in card


def test_bad_config_is_one_line_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nhidden_size = 'big'\n")
    result = run_cli("lm", "--config", str(config), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing [data] table" in result.stderr or "hidden_size" in result.stderr
    assert not (tmp_path / "o").exists()
