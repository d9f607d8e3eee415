"""Sliding-window perplexity: every token scored once, and equal to HF transformers' on a real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from frugal.errors import ConfigError
from frugal.eval.perplexity import evaluate_perplexity, window_spans

WIKITEXT_TEST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2_valid_test" / "test.txt"


@pytest.mark.parametrize("num_tokens,context,stride", [(10, 4, 2), (10, 4, 4), (2, 8, 4), (100, 32, 7), (33, 32, 16)])
def test_windows_score_every_token_once(num_tokens, context, stride):
    scored = []
    for begin, end, first in window_spans(num_tokens, context, stride):
        assert 0 <= begin < first <= end <= num_tokens and end - begin <= context
        scored.extend(range(first, end))
    assert scored == list(range(1, num_tokens))


def test_bad_windows_are_rejected():
    with pytest.raises(ConfigError):
        window_spans(10, 1, 1)
    with pytest.raises(ConfigError):
        window_spans(10, 4, 5)


@pytest.fixture(scope="module")
def wikitext_head(tmp_path_factory):
    if not WIKITEXT_TEST.is_file():
        pytest.skip("wikitext2 not present")
    path = tmp_path_factory.mktemp("ppl") / "head.txt"
    path.write_text(WIKITEXT_TEST.read_text(encoding="utf-8")[:3000])
    return path


def test_single_window_perplexity_equals_transformers(stories260k, wikitext_head):
    transformers = pytest.importorskip("transformers")
    from frugal.model.tokenizer import load_tokenizer

    result = evaluate_perplexity(stories260k, wikitext_head, max_tokens=200, context_len=256, progress=False)
    assert result.num_windows == 1 and result.num_scored_tokens == 199
    ids = torch.tensor([load_tokenizer(stories260k).encode(wikitext_head.read_text())[:200]])
    model = transformers.AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_quantized_perplexity_is_close_and_sliding_windows_work(stories260k, wikitext_head):
    dense = evaluate_perplexity(stories260k, wikitext_head, max_tokens=300, context_len=128, stride=64,
                                progress=False)
    int8 = evaluate_perplexity(stories260k, wikitext_head, "int8", max_tokens=300, context_len=128, stride=64,
                               progress=False)
    assert dense.num_windows == 4 and dense.num_scored_tokens == 299
    assert int8.perplexity != dense.perplexity
    assert abs(int8.perplexity / dense.perplexity - 1) < 0.02


def test_cli_prints_json(stories260k, wikitext_head, capsys):
    from frugal.cli.main import main

    code = main(["eval", "perplexity", str(stories260k), "--data", str(wikitext_head), "--max-tokens", "100",
                 "--quantization", "int4", "--group-size", "64", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["quantization"] == "int4-g64-sym" and record["num_scored_tokens"] == 99
    assert record["perplexity"] > 1 and record["tokens_per_s"] > 0
    assert main(["eval", "perplexity", str(stories260k), "--data", str(wikitext_head) + ".missing"]) == 2
