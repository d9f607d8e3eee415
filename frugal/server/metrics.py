"""Prometheus metrics for `GET /metrics` (prometheus-client, one registry per app).

Counters: HTTP requests by endpoint and status code, finished requests by reason, prompt and
generated tokens, preemptions. Histograms (seconds, measured in the server from the moment a request
is accepted): time to first token, inter-token latency (the gap between two successive token
deliveries of one sequence) and end-to-end latency. Gauges, read from the engine's latest snapshot at
scrape time: requests waiting (queue depth) and running, KV blocks used / free / total, and requests
the server holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from frugal.engine.async_engine import AsyncEngine
from frugal.outputs import CompletionDelta

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Engine state at scrape time, from the AsyncEngine's frozen snapshot (no lock, no engine call)."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine

    def collect(self) -> Iterable:
        snap = self._engine.snapshot()
        gauges = (
            ("frugal_num_requests_waiting", "Sequences waiting for a seat (the scheduler's queue depth)",
             snap.num_waiting),
            ("frugal_num_requests_running", "Sequences holding a seat", snap.num_running),
            ("frugal_kv_cache_blocks_used", "KV cache blocks referenced by a request", snap.num_used_blocks),
            ("frugal_kv_cache_blocks_free", "KV cache blocks free to allocate", snap.num_free_blocks),
            ("frugal_kv_cache_blocks_total", "KV cache blocks in the pool", snap.num_blocks),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("frugal_num_preemptions", "Requests preempted (KV freed, recomputed later)",
                                  value=snap.num_preemptions)
        yield CounterMetricFamily("frugal_engine_steps", "Engine steps run", value=snap.num_steps)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("frugal_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.finished_requests = Counter("frugal_request_finish", "Generation requests finished, by reason "
                                         "(stop, length, abort = client gone, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("frugal_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("frugal_generation_tokens", "Tokens generated and delivered", registry=r)
        self.time_to_first_token = Histogram("frugal_time_to_first_token_seconds", "Time to first token",
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("frugal_inter_token_latency_seconds",
                                             "Gap between successive token deliveries of one sequence",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram("frugal_e2e_request_latency_seconds", "End-to-end request latency",
                                     buckets=_E2E_BUCKETS, registry=r)
        self.requests_in_flight = Gauge("frugal_num_requests_in_flight", "Generation requests the server holds",
                                        registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int) -> "RequestTracker":
        return RequestTracker(self, num_prompt_tokens)


class RequestTracker:
    """Timing of one accepted generation request (all its prompts and samples)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self._metrics = metrics
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self._last_token_time: dict[tuple[str, int], float] = {}
        self._finish_reasons: list[str] = []
        self._closed = False
        metrics.prompt_tokens.inc(num_prompt_tokens)
        metrics.requests_in_flight.inc()

    def on_delta(self, delta: CompletionDelta) -> None:
        if delta.token_ids:
            now = time.monotonic()
            self._metrics.generation_tokens.inc(len(delta.token_ids))
            if self.first_token_time is None:
                self.first_token_time = now
                self._metrics.time_to_first_token.observe(now - self.arrival_time)
            key = (delta.request_id, delta.index)
            last = self._last_token_time.get(key)
            if last is not None:
                self._metrics.inter_token_latency.observe(now - last)
            self._last_token_time[key] = now
        if delta.finish_reason is not None:
            self._finish_reasons.append(delta.finish_reason)

    def close(self, num_sequences: int, error: bool = False) -> None:
        """Record the end (idempotent): finished normally when every sequence had its final delta."""
        if self._closed:
            return
        self._closed = True
        metrics = self._metrics
        metrics.requests_in_flight.dec()
        if error:
            reason = "error"
        elif len(self._finish_reasons) < num_sequences:
            reason = "abort"
        else:
            reason = "length" if "length" in self._finish_reasons else "stop"
        metrics.finished_requests.labels(reason).inc()
        if reason in ("stop", "length"):
            metrics.e2e_latency.observe(time.monotonic() - self.arrival_time)


class MetricsMiddleware:
    """Pure ASGI middleware counting responses by endpoint and status (401s and 400s included)."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: Iterable[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"  # bounded label set under fuzzing
        status_seen: list[int] = []

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not status_seen:
                self.metrics.http_requests.labels(endpoint, "500").inc()
            raise
