"""`frugal serve` as a user runs it (a subprocess): SIGTERM drains in-flight requests within the
drain timeout, then the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .helpers import free_port, start_serve_process, wait_healthy


def read_stream(port: int, body: dict, first_token: threading.Event, result: dict) -> None:
    token_ids, finish = result.setdefault("token_ids", []), None
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    result["done"] = line == "data: [DONE]" or result.get("done", False)
                    continue
                choice = json.loads(line[6:])["choices"][0]
                token_ids.extend(choice["token_ids"])
                finish = choice["finish_reason"] or finish
                first_token.set()
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        result.update(finish=finish, ended=time.monotonic())
        first_token.set()


def start_stream(port: int, max_tokens: int, n: int = 1):
    first_token, result = threading.Event(), {}
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True, "n": n,
            "ignore_eos": True, "return_token_ids": True}
    reader = threading.Thread(target=read_stream, args=(port, body, first_token, result), daemon=True)
    reader.start()
    assert first_token.wait(60), "no first token"
    return reader, result


def test_sigterm_drains_in_flight_stream_then_exits_0(stories260k):
    port = free_port()
    process = start_serve_process(stories260k, port, "--drain-timeout", "60")
    try:
        wait_healthy(port, process)
        reader, result = start_stream(port, max_tokens=500)
        process.send_signal(signal.SIGTERM)
        tokens_at_signal = len(result["token_ids"])
        time.sleep(0.2)
        with pytest.raises(httpx.TransportError):  # the listening socket is closed at once
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        reader.join(120)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert "error" not in result, result
    assert tokens_at_signal < 500, "the stream had ended before SIGTERM; the test proves nothing"
    assert len(result["token_ids"]) == 500 and result["finish"] == "length" and result["done"], output


def test_drain_is_bounded(stories260k):
    port = free_port()
    process = start_serve_process(stories260k, port, "--drain-timeout", "0.5")
    try:
        wait_healthy(port, process)
        # 32 x 500 tokens: hundreds of steps, far more than half a second even on an idle machine.
        reader, result = start_stream(port, max_tokens=500, n=32)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        exited = time.monotonic() - signalled
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert exited < 10, f"took {exited:.1f}s to exit with --drain-timeout 0.5"
    assert len(result["token_ids"]) < 32 * 500 and not result.get("done"), "the stream was not cut"


def test_serve_rejects_bad_options(stories260k):
    import subprocess
    import sys

    for args, message in ((["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                          (["--scheduling-policy", "nope"], "nope")):
        result = subprocess.run([sys.executable, "-m", "frugal.cli.main", "serve", "--model", str(stories260k),
                                 "--kv-cache-memory", "8MiB", *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
