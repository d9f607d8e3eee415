"""POST /v1/chat/completions through the official `openai` client, checked against offline LLM.chat."""

from __future__ import annotations

import pytest

from frugal import SamplingParams

from .conftest import MODEL_NAME

MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Once upon a time"}]


def test_chat_matches_offline_chat(server, offline_llm):
    client = server.client()
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0,
                                              extra_body={"return_token_ids": True})
    expected = offline_llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=20))[0]
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.token_ids == expected.outputs[0].token_ids
    assert choice.finish_reason == expected.outputs[0].finish_reason
    # The template was applied: the prompt is the rendered conversation, not the raw text.
    assert response.usage.prompt_tokens == len(offline_llm.apply_chat_template(MESSAGES))
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_chat_streaming_chunks_role_content_usage(server):
    client = server.client()
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=25, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=25,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n_content_parts_and_logprobs(server, offline_llm):
    client = server.client()
    parts = [{"role": "system", "content": [{"type": "text", "text": "You tell stories."}]},
             {"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]
    as_parts = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=10, temperature=0)
    as_text = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content

    sampled = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, n=3, seed=3,
                                             temperature=1.0, extra_body={"return_token_ids": True})
    expected = offline_llm.chat(MESSAGES, SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=3))[0]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.token_ids for c in sampled.choices] == [o.token_ids for o in expected.outputs]

    with_lp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == with_lp.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-6)  # greedy
        assert bytes(token.bytes).decode() == token.token


def test_chat_max_completion_tokens_and_stop(server):
    client = server.client()
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=7,
                                              temperature=0)
    assert response.usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"
    text = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=30,
                                          temperature=0).choices[0].message.content
    stop = text.split()[3]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=30, temperature=0,
                                             stop=stop)
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
