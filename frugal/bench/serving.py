"""`frugal bench serve`: replay a request trace against a `frugal serve` it starts, once per
scheduling policy, and report throughput and latency percentiles (JSON + PNG).

Each trace request is sent at its arrival time as a streaming /v1/completions call with a synthetic
prompt of exactly its (fitted) length and `max_tokens` = its output length, `ignore_eos` on, so every
request generates exactly the tokens the trace says (vLLM's benchmark_serving does the same). Per
request the client measures time to first token, the gaps between token deliveries (inter-token
latency) and the end-to-end latency, which is the job completion time (JCT) FastServe minimises.
All policies of one run replay the same requests with the same prompts against a fresh server on the
same machine, so their numbers compare directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from frugal.bench.trace import TraceRequest, fit_to_context, load_azure_trace, synthetic_prompt
from frugal.errors import FrugalError

logger = logging.getLogger(__name__)

SERVED_NAME = "bench"


@dataclass
class RequestResult:
    arrival_s: float
    prompt_len: int
    output_len: int            # tokens asked for
    num_tokens: int = 0        # tokens received
    ttft_s: float | None = None
    e2e_s: float | None = None
    send_lag_s: float = 0.0    # how late the client sent it (client overload shows here)
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


# ---- the server ----------------------------------------------------------------------------------

class ServerProcess:
    """`frugal serve` in a subprocess on a free loopback port; stopped with SIGTERM (drain) on exit."""

    def __init__(self, model: str, policy: str, engine_args: list[str], startup_timeout_s: float = 300.0):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "frugal.cli.main", "serve", "--model", model, "--port", str(self.port),
                        "--served-model-name", SERVED_NAME, "--scheduling-policy", policy, "--no-access-log",
                        "--log-level", "warning", *engine_args]
        self._startup_timeout_s = startup_timeout_s
        self._log = tempfile.NamedTemporaryFile("w+", prefix="frugal-bench-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FrugalError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise FrugalError(f"the server did not become healthy in {self._startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def log_tail(self, num_chars: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-num_chars:]


# ---- the client ----------------------------------------------------------------------------------

async def _one_request(client, base_url: str, request: TraceRequest, prompt: list[int], start: float,
                       result: RequestResult) -> None:
    await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    result.send_lag_s = sent - (start + request.arrival_s)
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": request.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    last = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    result.error = payload["error"].get("message", "error")
                    return
                num_new = sum(len(c.get("token_ids") or ()) for c in payload.get("choices", ()))
                if not num_new:
                    continue
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now
                result.num_tokens += num_new
        result.e2e_s = time.perf_counter() - sent
        if result.num_tokens != request.output_len:
            result.error = f"received {result.num_tokens} tokens, expected {request.output_len}"
    except Exception as exc:  # noqa: BLE001 - one failed request is a data point, not the end of the run
        result.error = f"{type(exc).__name__}: {exc}"


async def replay(base_url: str, requests: list[TraceRequest], prompts: list[list[int]],
                 timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time; returns the per-request results and the wall time from
    the first send to the last completion. Requests still running after `timeout_s` are cancelled."""
    import httpx

    results = [RequestResult(r.arrival_s, r.prompt_len, r.output_len) for r in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(_one_request(client, base_url, r, p, start, res))
                 for r, p, res in zip(requests, prompts, results)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
    for result in results:
        if result.e2e_s is None and result.error is None:
            result.error = f"not finished within the {timeout_s:.0f}s run timeout"
    return results, duration


# ---- numbers -------------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max())}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    done = [r for r in results if r.error is None]
    num_output = sum(r.num_tokens for r in done)
    num_prompt = sum(r.prompt_len for r in done)
    return {
        "num_requests": len(results),
        "num_completed": len(done),
        "num_failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration_s,
        "request_throughput_per_s": len(done) / duration_s if duration_s > 0 else None,
        "output_throughput_tok_per_s": num_output / duration_s if duration_s > 0 else None,
        "total_throughput_tok_per_s": (num_output + num_prompt) / duration_s if duration_s > 0 else None,
        "num_output_tokens": num_output,
        "num_prompt_tokens": num_prompt,
        "e2e_latency_s": _percentiles([r.e2e_s for r in done]),  # = job completion time (JCT)
        "ttft_s": _percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "inter_token_latency_s": _percentiles([gap for r in done for gap in r.itl_s]),
        "send_lag_s": _percentiles([r.send_lag_s for r in results]),
    }


def _scrape(base_url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"frugal_num_preemptions_total", "frugal_engine_steps_total", "frugal_kv_cache_blocks_total"}
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = sample.value
    return values


def _server_info(base_url: str) -> dict:
    import httpx

    card = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]
    return {"max_model_len": card["max_model_len"], "model_dir": card["root"]}


def run(model: str, trace: Path, policies: list[str], rate_scale: float, num_requests: int | None, start_row: int,
        max_prompt_fraction: float, engine_args: list[str], seed: int, timeout_s: float, command: str) -> dict:
    from frugal.model.arch_config import load_arch_config

    raw = load_azure_trace(trace, num_requests, start_row, rate_scale)
    runs, fitted, adjustment, prompts = [], None, None, None
    for policy in policies:
        logger.info("policy %s: starting the server", policy)
        with ServerProcess(model, policy, engine_args) as server:
            info = _server_info(server.base_url)
            if fitted is None:
                fitted, adjustment = fit_to_context(raw, info["max_model_len"], max_prompt_fraction)
                arch = load_arch_config(Path(info["model_dir"]))
                rng = random.Random(seed)
                bos = arch.bos_token_id if getattr(arch, "bos_token_id", None) is not None else None
                prompts = [synthetic_prompt(r.prompt_len, arch.vocab_size, rng, bos) for r in fitted]
            elif info["max_model_len"] != adjustment["max_model_len"]:
                raise FrugalError("the servers of one run disagree on max_model_len")
            logger.info("policy %s: replaying %d requests over %.1fs of trace time", policy, len(fitted),
                        fitted[-1].arrival_s)
            results, duration = asyncio.run(replay(server.base_url, fitted, prompts, timeout_s))
            summary = summarize(results, duration)
            summary["server"] = _scrape(server.base_url)
        runs.append({"policy": policy, "server_command": " ".join(server.command), "summary": summary,
                     "requests": [asdict(r) for r in results]})
        logger.info("policy %s: %s", policy, format_summary(summary))
    return {
        "benchmark": "serve",
        "command": command,
        "model": model,
        "trace": str(trace),
        "trace_rows": {"start": start_row, "count": len(raw)},
        "rate_scale": rate_scale,
        "trace_duration_s": fitted[-1].arrival_s if fitted else None,
        "length_adjustment": adjustment,
        "engine_args": engine_args,
        "seed": seed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "runs": runs,
    }


def format_summary(summary: dict) -> str:
    def ms(stats: dict, key: str) -> str:
        return "n/a" if stats[key] is None else f"{stats[key] * 1000:.0f}ms"

    e2e, ttft = summary["e2e_latency_s"], summary["ttft_s"]
    return (f"{summary['num_completed']}/{summary['num_requests']} ok in {summary['duration_s']:.1f}s, "
            f"{summary['output_throughput_tok_per_s'] or 0:.1f} out tok/s; JCT mean {ms(e2e, 'mean')} "
            f"p99 {ms(e2e, 'p99')}; TTFT mean {ms(ttft, 'mean')} p99 {ms(ttft, 'p99')}")


# ---- output --------------------------------------------------------------------------------------

def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for run_ in result["runs"]:
        done = [r for r in run_["requests"] if r["error"] is None]
        for ax, key in ((axes[0], "e2e_s"), (axes[1], "ttft_s")):
            values = np.sort([r[key] for r in done if r[key] is not None])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=run_["policy"])
    axes[0].set(title="job completion time (end-to-end latency)", xlabel="seconds", ylabel="fraction of requests")
    axes[1].set(title="time to first token", xlabel="seconds", ylabel="fraction of requests")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    names = [r["policy"] for r in result["runs"]]
    x = np.arange(len(names))
    bars = (("JCT mean", "e2e_latency_s", "mean"), ("JCT p99", "e2e_latency_s", "p99"),
            ("TTFT mean", "ttft_s", "mean"), ("TTFT p99", "ttft_s", "p99"))
    width = 0.8 / len(bars)
    for i, (label, group, stat) in enumerate(bars):
        values = [r["summary"][group][stat] or 0.0 for r in result["runs"]]
        axes[2].bar(x + (i - 1.5) * width, values, width, label=label)
    axes[2].set_xticks(x, names)
    axes[2].set(title="per policy", ylabel="seconds")
    axes[2].legend()
    adj = result["length_adjustment"] or {}
    fig.suptitle(f"{Path(result['model']).name}: {Path(result['trace']).name}, {result['trace_rows']['count']} "
                 f"requests, rate x{result['rate_scale']:g}, prompts x{adj.get('prompt_scale', 1):.3g} "
                 f"(context {adj.get('max_model_len')})", fontsize=10)
    fig.text(0.01, 0.01, result["command"], fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(result, out_dir, name, lambda png: plot(result, png))
