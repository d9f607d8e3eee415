"""POST /v1/completions through the official `openai` client, checked against offline LLM.generate."""

from __future__ import annotations

import asyncio

import pytest

from frugal import SamplingParams

from .conftest import MODEL_NAME
from .helpers import wait_idle

WORDS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom", "The sun was", "Ben and Mia",
         "There was a big", "She looked at the"]
PROMPTS_32 = [f"{WORDS[i % len(WORDS)]}{' and' * (i // len(WORDS))}" for i in range(32)]


def offline(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params))[0]


def test_completion_matches_offline_generate(server, offline_llm):
    client = server.client()
    response = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=24,
                                         temperature=0, extra_body={"return_token_ids": True})
    expected = offline(offline_llm, "Once upon a time", max_tokens=24, temperature=0.0)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == MODEL_NAME
    assert choice.text == expected.outputs[0].text
    assert choice.token_ids == expected.outputs[0].token_ids
    assert choice.finish_reason == expected.outputs[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24


def test_prompt_forms_batch_and_n(server, offline_llm):
    client = server.client()
    token_prompt = offline_llm.tokenizer.encode("The little dog")
    response = client.completions.create(model=MODEL_NAME, prompt=["Once upon a time", "Lily wanted to"],
                                         max_tokens=12, temperature=0.8, seed=11, n=2,
                                         extra_body={"return_token_ids": True})
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for k, prompt in enumerate(["Once upon a time", "Lily wanted to"]):
        expected = offline(offline_llm, prompt, max_tokens=12, temperature=0.8, seed=11, n=2)
        for i in range(2):
            assert response.choices[k * 2 + i].token_ids == expected.outputs[i].token_ids
    assert response.choices[0].token_ids != response.choices[1].token_ids  # the two samples differ
    by_ids = client.completions.create(model=MODEL_NAME, prompt=token_prompt, max_tokens=10, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="The little dog", max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(token_prompt)
    nested = client.completions.create(model=MODEL_NAME, prompt=[token_prompt, token_prompt[:3]], max_tokens=4,
                                       temperature=0)
    assert nested.choices[0].text == by_ids.choices[0].text[: len(nested.choices[0].text)]
    assert nested.usage.prompt_tokens == len(token_prompt) + 3


def test_streaming_equals_non_streaming_with_usage(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, prompt="One day, Tom", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert sum(len(c.choices[0].token_ids) for c in chunks if c.choices) == 30
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_seed_and_echo(server, offline_llm):
    client = server.client()
    base = offline(offline_llm, "Once upon a time", max_tokens=40, temperature=0.0).outputs[0].text
    stop = base.split()[4]  # a word the greedy continuation reaches
    expected = offline(offline_llm, "Once upon a time", max_tokens=40, temperature=0.0, stop=[stop])
    response = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=40,
                                         temperature=0, stop=[stop])
    assert response.choices[0].text == expected.outputs[0].text == base[: base.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == expected.outputs[0].text

    seeded = [client.completions.create(model=MODEL_NAME, prompt="The sun was", max_tokens=16, temperature=1.0,
                                        seed=5).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] == offline(offline_llm, "The sun was", max_tokens=16, temperature=1.0,
                                             seed=5).outputs[0].text
    echoed = client.completions.create(model=MODEL_NAME, prompt="The sun was", max_tokens=5, temperature=0,
                                       echo=True)
    plain = client.completions.create(model=MODEL_NAME, prompt="The sun was", max_tokens=5, temperature=0)
    assert echoed.choices[0].text == "The sun was" + plain.choices[0].text


def test_logprobs_match_offline(server, offline_llm):
    client = server.client()
    response = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12,
                                         temperature=0, logprobs=3)
    expected = offline(offline_llm, "Once upon a time", max_tokens=12, temperature=0.0, logprobs=3).outputs[0]
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 12
    for token_id, entry, got in zip(expected.token_ids, expected.logprobs, logprobs.token_logprobs):
        assert got == pytest.approx(entry[token_id].logprob, abs=1e-5)
    # Greedy: the chosen token is the most likely one, and every position lists >= 3 alternatives.
    for got, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) >= 3 and got == pytest.approx(max(top.values()), abs=1e-6)
    # Token texts read in context and tile the completion text; offsets index into it.
    assert "".join(logprobs.tokens) == response.choices[0].text
    for offset, token in zip(logprobs.text_offset, logprobs.tokens):
        assert response.choices[0].text[offset: offset + len(token)] == token
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == logprobs.text_offset


def test_32_concurrent_greedy_streams_equal_offline(server, offline_llm):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    expected = offline_llm.generate(PROMPTS_32, params)

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=32, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True})
        text, token_ids, finish = [], [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            token_ids.extend(chunk.choices[0].token_ids)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(text), token_ids, finish

    async def run():
        async with server.async_client() as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in PROMPTS_32)), timeout=120)

    results = asyncio.run(run())
    for prompt, want, (text, token_ids, finish) in zip(PROMPTS_32, expected, results):
        assert token_ids == want.outputs[0].token_ids, prompt
        assert text == want.outputs[0].text, prompt
        assert finish == want.outputs[0].finish_reason
    wait_idle(server.base_url)


def test_models_health_and_metrics(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    import httpx
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    metrics = wait_idle(server.base_url)
    for name in ("frugal_time_to_first_token_seconds_count", "frugal_inter_token_latency_seconds_count",
                 "frugal_e2e_request_latency_seconds_count", "frugal_prompt_tokens_total",
                 "frugal_generation_tokens_total"):
        assert metrics[name] > 0, name
    assert metrics['frugal_http_requests_total{endpoint="/v1/completions",status="200"}'] > 0
    assert metrics["frugal_kv_cache_blocks_free"] + metrics["frugal_kv_cache_blocks_used"] == \
        metrics["frugal_kv_cache_blocks_total"]
