"""Start real uvicorn servers on free loopback ports (in a thread or a subprocess) and read them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from frugal.engine.async_engine import AsyncEngine
from frugal.server.app import create_app
from frugal.server.serving_common import ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# A plain chat template for the real stories260K checkpoint (which ships none).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_chat_model_dir(src: Path, dst: Path) -> Path:
    """A copy of a real checkpoint with CHAT_TEMPLATE in tokenizer_config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(src / name, dst / name)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return dst


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1:<free port>, run in a daemon thread."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, owns_engine: bool = False):
        self.app = create_app(engine, config, owns_engine=owns_engine)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout_s: float = 120.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "unused"),
                             max_retries=0, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "unused"),
                                  max_retries=0, timeout=kwargs.pop("timeout", 60.0), **kwargs)


def read_metrics(base_url: str) -> dict[str, float]:
    """Samples of GET /metrics as {'name{label="v",...}': value} (labels sorted), plus bare names."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05):
    """Poll until predicate() is truthy (returns its value) or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


def wait_idle(base_url: str, timeout_s: float = 20.0) -> dict[str, float]:
    """Wait until the engine runs and holds nothing; returns the metrics then."""
    def idle():
        m = read_metrics(base_url)
        if (m["frugal_num_requests_running"] == 0 and m["frugal_num_requests_waiting"] == 0
                and m["frugal_kv_cache_blocks_used"] == 0 and m["frugal_num_requests_in_flight"] == 0):
            return m
        return None
    return wait_until(idle, timeout_s)


def start_serve_process(model_dir: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`frugal serve` in a subprocess (its own process group), output to a pipe."""
    command = [sys.executable, "-m", "frugal.cli.main", "serve", "--model", str(model_dir), "--port", str(port),
               "--kv-cache-memory", "64MiB", "--no-access-log", *extra]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_healthy(port: int, process: subprocess.Popen | None = None, timeout_s: float = 180.0) -> None:
    def healthy():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    wait_until(healthy, timeout_s, 0.1)
