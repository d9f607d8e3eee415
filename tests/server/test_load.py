"""Load: 64 concurrent clients, each sending requests back to back (bounded in count and time); every
token arrives exactly once and matches the offline engine."""

from __future__ import annotations

import asyncio
import random

from frugal import SamplingParams

from .conftest import MODEL_NAME
from .helpers import read_metrics, wait_idle

NUM_CLIENTS = 64
REQUESTS_PER_CLIENT = 2
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom", "The sun was", "Ben and Mia",
           "There was a big", "She looked at the"]
MAX_TOKENS = (4, 12, 20)


def test_64_concurrent_clients_no_lost_or_duplicated_tokens(server, offline_llm):
    rng = random.Random(0)
    plan = [[(rng.choice(PROMPTS), rng.choice(MAX_TOKENS), rng.random() < 0.75) for _ in range(REQUESTS_PER_CLIENT)]
            for _ in range(NUM_CLIENTS)]
    expected = {}
    for max_tokens in MAX_TOKENS:
        outputs = offline_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        for prompt, output in zip(PROMPTS, outputs):
            expected[prompt, max_tokens] = output.outputs[0]
    wait_idle(server.base_url)
    before = read_metrics(server.base_url)

    async def client_session(client, requests):
        results = []
        for prompt, max_tokens, stream in requests:
            kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                          extra_body={"ignore_eos": True, "return_token_ids": True})
            if stream:
                chunks = [c async for c in await client.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs)]
                token_ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                usage = chunks[-1].usage.completion_tokens
            else:
                response = await client.completions.create(**kwargs)
                token_ids, text = response.choices[0].token_ids, response.choices[0].text
                usage = response.usage.completion_tokens
            results.append((prompt, max_tokens, token_ids, text, usage))
        return results

    async def run():
        async with server.async_client(timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(client_session(client, p) for p in plan)), timeout=240)

    sessions = asyncio.run(run())
    total_tokens = 0
    for session in sessions:
        for prompt, max_tokens, token_ids, text, usage in session:
            want = expected[prompt, max_tokens]
            assert token_ids == want.token_ids, (prompt, max_tokens)
            assert text == want.text and usage == max_tokens
            total_tokens += len(token_ids)
    assert sum(len(s) for s in sessions) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    after = wait_idle(server.base_url)
    assert after["frugal_generation_tokens_total"] - before["frugal_generation_tokens_total"] == total_tokens
    assert after['frugal_request_finish_total{reason="length"}'] - \
        before.get('frugal_request_finish_total{reason="length"}', 0) == NUM_CLIENTS * REQUESTS_PER_CLIENT
