"""A client that goes away aborts its request at once: its KV blocks are freed and it stops running."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import MODEL_NAME
from .helpers import read_metrics, wait_idle

MAX_TOKENS = 480


def test_aborting_50_streams_midway_frees_every_block(server):
    wait_idle(server.base_url)
    before = read_metrics(server.base_url)
    held: dict[str, float] = {}

    async def open_and_read(client, i):
        stream = await client.completions.create(model=MODEL_NAME, prompt=f"Once upon a time {i}",
                                                 max_tokens=MAX_TOKENS, temperature=0.5, seed=i, stream=True,
                                                 extra_body={"ignore_eos": True})
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 3:
                break
        return stream

    async def run():
        async with server.async_client() as client:
            streams = await asyncio.wait_for(asyncio.gather(*(open_and_read(client, i) for i in range(50))), 60)
            held.update(read_metrics(server.base_url))  # all 50 are mid-stream now
            await asyncio.gather(*(s.close() for s in streams))

    asyncio.run(run())
    assert held["frugal_kv_cache_blocks_used"] > 0 and held["frugal_num_requests_in_flight"] == 50
    after = wait_idle(server.base_url, timeout_s=20)
    assert after["frugal_kv_cache_blocks_used"] == 0
    assert after["frugal_num_requests_running"] == 0 and after["frugal_num_requests_waiting"] == 0
    aborted = after.get('frugal_request_finish_total{reason="abort"}', 0) - \
        before.get('frugal_request_finish_total{reason="abort"}', 0)
    assert aborted == 50  # none of them ran to its end (that would count as "length")
    generated = after["frugal_generation_tokens_total"] - before["frugal_generation_tokens_total"]
    assert 50 * 3 <= generated < 50 * MAX_TOKENS


def test_non_streaming_client_timeout_aborts(server):
    wait_idle(server.base_url)
    before = read_metrics(server.base_url)
    try:
        httpx.post(f"{server.base_url}/v1/completions", timeout=0.5,
                   json={"model": MODEL_NAME, "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "n": 16})
        raise AssertionError("the request should have outlived the client's timeout")
    except httpx.ReadTimeout:
        pass
    after = wait_idle(server.base_url, timeout_s=20)
    assert after['frugal_request_finish_total{reason="abort"}'] - \
        before.get('frugal_request_finish_total{reason="abort"}', 0) == 1
    assert after["frugal_generation_tokens_total"] - before["frugal_generation_tokens_total"] < 16 * 500
