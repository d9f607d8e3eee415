"""Bad input gets its status code and an OpenAI-shaped error naming the problem; the server answers
normally afterwards and requests running meanwhile are untouched."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from frugal import LLM
from frugal.engine.async_engine import AsyncEngine
from frugal.server.serving_common import ServerConfig

from .conftest import MODEL_NAME
from .helpers import ServerThread, wait_idle

API_KEY = "sekret-key"


def post(server, path, body=None, content=None, headers=None):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.base_url}{path}", json=body, content=content, headers=headers, timeout=30)


def assert_error(response, status, *fragments, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_and_non_object(server, path):
    assert_error(post(server, path, content=b'{"prompt": "x", '), 400, "malformed JSON")
    assert_error(post(server, path, content=b"\xff\xfe not json"), 400)
    assert_error(post(server, path, content=b"[1, 2]"), 400, "must be a JSON object")
    assert_error(post(server, path, content=b""), 400)
    assert_error(post(server, path, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 400,
                 "Content-Type: application/json")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "n": 1.5}, "n"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "seed": 2**70}, "seed"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
])
def test_completion_wrong_types_and_ranges(server, body, param):
    error = assert_error(post(server, "/v1/completions", {"model": MODEL_NAME, **body}), 400, param=None)
    assert error["param"].startswith(param), error


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"prompt": [1, 999999]}, "999999"),
    ({"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
])
def test_completion_bad_values_from_the_engine(server, body, fragment):
    assert_error(post(server, "/v1/completions", {"model": MODEL_NAME, **body}), 400, fragment)


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
])
def test_chat_bad_input(server, body, fragment):
    assert_error(post(server, "/v1/chat/completions", {"model": MODEL_NAME, **body}), 400, fragment)


def test_context_limit_is_named(server, offline_llm):
    client = server.client()
    long_prompt = [1] + [300] * 600
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4)
    assert info.value.status_code == 400 and "512" in info.value.message and "601" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=510)
    assert "maximum context length is 512" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "a " * 700}])
    assert "512" in info.value.message


def test_unknown_model_route_and_method(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert "gpt-17" in info.value.message and info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    assert_error(httpx.get(f"{server.base_url}/v1/nowhere"), 404)
    assert_error(httpx.get(f"{server.base_url}/v1/completions"), 405)


def test_bad_requests_never_disturb_running_streams(server, offline_llm):
    """Good streams run while a flood of bad requests hits the server; all finish exactly right."""
    from frugal import SamplingParams

    prompts = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom"]
    expected = offline_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    bad_bodies = [b'{"prompt": ', b'{"prompt": "x", "n": -1}', b'{"model": "nope", "prompt": "x"}',
                  b'{"prompt": [1, 99999]}', b'{"prompt": "x", "max_tokens": 9999}']
    statuses: list[int] = []

    def flood(stop: threading.Event):
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            while (not stop.is_set() or len(statuses) < 10) and len(statuses) < 100:
                for body in bad_bodies:
                    statuses.append(http.post("/v1/completions", content=body,
                                              headers={"Content-Type": "application/json"}).status_code)

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=48, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        return [t async for chunk in stream for t in chunk.choices[0].token_ids]

    async def run():
        async with server.async_client() as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), timeout=120)

    stop = threading.Event()
    flooder = threading.Thread(target=flood, args=(stop,), daemon=True)
    flooder.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        flooder.join(30)
    assert statuses and set(statuses) <= {400, 404}
    assert results == [e.outputs[0].token_ids for e in expected]
    after = server.client().completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5,
                                               temperature=0)
    assert after.choices[0].text == expected[0].outputs[0].text[: len(after.choices[0].text)]
    wait_idle(server.base_url)


# ---- a second server (its own engine, 1 seat): API key, queue bound, a model without chat template --

@pytest.fixture(scope="module")
def guarded_server(stories260k):
    engine = AsyncEngine(LLM(str(stories260k), dtype="float32", kv_cache_memory="8MiB", max_num_seqs=1).engine)
    thread = ServerThread(engine, ServerConfig(served_model_names=("plain",), api_key=API_KEY, max_queue=1),
                          owns_engine=True).start()
    yield thread
    thread.stop()
    engine.shutdown()


def test_api_key(guarded_server):
    base = guarded_server.base_url
    error = assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}), 401, "missing API key")
    assert error["code"] == "invalid_api_key"
    # The key is checked before the body is parsed: malformed JSON without a key is still a 401.
    assert_error(httpx.post(f"{base}/v1/completions", content=b"{", headers={"Authorization": "Bearer nope"}),
                 401, "invalid API key")
    with pytest.raises(openai.AuthenticationError):
        guarded_server.client(api_key="wrong").models.list()
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/metrics").status_code == 200
    client = guarded_server.client(api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == ["plain"]
    assert client.completions.create(model="plain", prompt="Once", max_tokens=3).usage.completion_tokens == 3


def test_no_chat_template(guarded_server):
    with pytest.raises(openai.BadRequestError) as info:
        guarded_server.client(api_key=API_KEY).chat.completions.create(
            model="plain", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in info.value.message


def test_queue_full_is_429_and_recovers(guarded_server):
    """1 seat + a queue of 1: two long streams fill the server, a third request gets 429."""
    client = guarded_server.client(api_key=API_KEY)
    kwargs = dict(model="plain", prompt="Once upon a time", max_tokens=400, stream=True,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    next(iter(first))
    second = client.completions.create(**kwargs)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="plain", prompt="hi", max_tokens=2)
        assert "capacity" in info.value.message and info.value.code == "queue_full"
        with pytest.raises(openai.BadRequestError) as too_big:  # more than the server could ever hold
            client.completions.create(model="plain", prompt="hi", max_tokens=2, n=3)
        assert "at most 2" in too_big.value.message
    finally:
        first.close()
        second.close()
    wait_idle(guarded_server.base_url)
    assert client.completions.create(model="plain", prompt="hi", max_tokens=2).usage.completion_tokens == 2
