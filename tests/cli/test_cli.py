"""The `frugal` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny_models import make_tiny_checkpoint


def run_cli(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal.cli.main", *args], capture_output=True, text=True,
                          input=input_text, timeout=300)


def test_generate_json(stories260k):
    result = run_cli("generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "20",
                     "--temperature", "0", "--json", "--kv-cache-memory", "8MiB")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["text"].startswith(",")  # "Once upon a time, there was ..."
    assert len(payload["token_ids"]) == 20 and payload["finish_reason"] == "length"
    assert payload["metrics"]["decode_tokens_per_s"] > 0


def test_generate_streams_text(stories260k):
    result = run_cli("generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "20",
                     "--temperature", "0", "--kv-cache-memory", "8MiB")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(", there was a little girl")


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = run_cli("generate", "hi", "--model", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr


def test_chat_repl(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "qwen", "qwen2", tokenizer="qwen")
    result = run_cli("chat", "--model", str(model_dir), "--max-tokens", "4", "--temperature", "0",
                     "--ignore-eos", "--kv-cache-memory", "8MiB", input_text="Hello\nHow are you?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 2


def test_chat_without_template_is_refused(stories260k):
    result = run_cli("chat", "--model", str(stories260k), input_text="hi\n")
    assert result.returncode == 2 and "chat template" in result.stderr
