"""`--speculative` on `frugal generate` and `frugal bench spec`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys



def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_with_speculative_gives_the_plain_greedy_text(stories260k):
    result = run_cli("generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "20",
                     "--temperature", "0", "--json", "--kv-cache-memory", "8MiB",
                     "--speculative", f"draft:{stories260k},k=3")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    # stories260K's greedy continuation (tests/cli/test_cli.py checks the same without speculation).
    assert payload["text"].startswith(", there was a little girl named Lily")
    assert len(payload["token_ids"]) == 20
    spec = payload["metrics"]["spec"]  # the target drafting for itself: every candidate accepted
    assert spec["num_accepted_tokens"] == spec["num_proposed_tokens"] > 0
    assert spec["tokens_per_target_step"] > 1 and spec["acceptance_by_position"][0] == 1.0


def test_generate_with_a_bad_speculative_option_is_a_clear_error(stories260k):
    result = run_cli("generate", "Hi", "--model", str(stories260k), "--speculative", "medusa:/nowhere")
    assert result.returncode != 0
    assert "no Medusa heads in /nowhere" in result.stderr and "Traceback" not in result.stderr


def test_bench_spec_writes_json_and_plot(stories260k, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": "x", "turns": [text]})
                                 for i, text in enumerate(["Once upon a time", "The dog ran"])) + "\n")
    result = run_cli("bench", "spec", str(stories260k), "--speculative", "ngram:n=2,k=3", "--prompts", str(prompts),
                     "--batch-sizes", "1", "2", "--num-prompts", "2", "--max-tokens", "6", "--out", str(tmp_path),
                     "--name", "s")
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "s.json").read_text())
    assert (tmp_path / "s.png").stat().st_size > 0
    runs = [r for r in payload["runs"] if r["method"] != "plain"]
    assert [r["batch"] for r in runs] == [1, 2]
    assert all(r["identical_to_plain"] and r["output_tokens"] == 12 and r["speedup"] > 0 for r in runs)
    assert "bench spec" in payload["command"]
