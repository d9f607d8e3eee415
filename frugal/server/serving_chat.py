"""POST /v1/chat/completions: the conversation through the checkpoint's chat template, one engine
request with n samples.

A stream opens with one role chunk per choice (`{"role": "assistant", "content": ""}`), then content
chunks, a last chunk per choice carrying its finish_reason, optionally a usage chunk with no choices
(`stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from frugal.engine.async_engine import EngineError, GenerateRequest
from frugal.errors import InvalidRequestError
from frugal.server.errors import bad_request
from frugal.server.protocol import ChatCompletionRequest
from frugal.server.serving_common import (
    SSE_DONE, ActiveRequest, ChoiceState, ServingContext, SSEResponse, chat_logprobs, check_unsupported,
    collect_until_disconnect, engine_error, sampling_params, sse, sse_error, usage,
)


def _check_unsupported(body: ChatCompletionRequest) -> None:
    check_unsupported(body)
    if body.tools:
        raise bad_request("tools are not supported", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported", "tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(f"response_format {body.response_format.type!r} is not supported (no constrained "
                          f"decoding); use 'text'", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")


def _messages(body: ChatCompletionRequest) -> list[dict]:
    messages = []
    for message in body.messages:
        content = message.content
        if content is None:
            content = ""
        elif not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        entry = {"role": message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    return messages


async def _prompt_ids(ctx: ServingContext, body: ChatCompletionRequest) -> list[int]:
    tokenizer = ctx.engine.tokenizer
    if not tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")

    def render() -> list[int]:  # on a worker thread: a long conversation must not stall the event loop
        text = tokenizer.apply_chat_template(_messages(body), add_generation_prompt=body.add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself

    try:
        token_ids = await asyncio.to_thread(render)
    except InvalidRequestError as exc:
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from exc
    return await ctx.tokenize(token_ids, "messages")


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, raw_request: Request) -> Response:
    model = ctx.resolve_model(body.model)
    _check_unsupported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(ctx, body, max_tokens, num_top)
    prompt_ids = await _prompt_ids(ctx, body)
    ctx.check_context(len(prompt_ids), max_tokens)

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    active = await ActiveRequest.start(ctx, [GenerateRequest(completion_id, prompt_ids, params)], len(prompt_ids))
    choices = [ChoiceState(index=i, prev_token_id=prompt_ids[-1]) for i in range(body.n)]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream(ctx, active, body, model, completion_id, choices, num_top, len(prompt_ids),
                                   include_usage), active)
    try:
        if not await collect_until_disconnect(raw_request, active, lambda d: choices[d.index].add(d)):
            return Response(status_code=499)  # the client is gone; nobody reads this
    except EngineError as exc:
        raise engine_error(exc) from exc
    finally:
        active.close()
    out_choices = [{
        "index": c.index, "message": {"role": "assistant", "content": c.text},
        "logprobs": (chat_logprobs(c.token_ids, c.logprobs, num_top, c, ctx.token_texts)
                     if num_top is not None else None),
        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
        "token_ids": c.token_ids if body.return_token_ids else None,
    } for c in choices]
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": out_choices, "usage": usage(len(prompt_ids), choices),
    })


async def _stream(ctx: ServingContext, active: ActiveRequest, body: ChatCompletionRequest, model: str,
                  completion_id: str, choices: list[ChoiceState], num_top: int | None, num_prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choice_payloads: list[dict], usage_payload: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choice_payloads}
        if include_usage:
            payload["usage"] = usage_payload
        return sse(payload)

    try:
        for choice in choices:
            yield chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for delta in active.deltas():
            choice = choices[delta.index]
            choice.add(delta)
            wants_tokens = delta.token_ids and (num_top is not None or body.return_token_ids)
            if not (delta.text or delta.finished or wants_tokens):
                continue  # text held back (a possible stop string) and nothing else to say
            logprobs = None
            if num_top is not None and delta.logprobs is not None:
                logprobs = chat_logprobs(delta.token_ids, delta.logprobs, num_top, choice, ctx.token_texts)
            yield chunk([{
                "index": choice.index, "delta": {"content": delta.text} if delta.text or not delta.finished else {},
                "logprobs": logprobs, "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason,
                "token_ids": delta.token_ids if body.return_token_ids else None,
            }])
        if include_usage:
            yield chunk([], usage(num_prompt_tokens, choices))
    except EngineError as exc:
        yield sse_error(exc)
    yield SSE_DONE
