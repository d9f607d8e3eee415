"""POST /v1/completions: one engine request per prompt (string, strings, token ids or lists of them),
n samples each; choice index = prompt index * n + sample index, as OpenAI numbers them.

Everything that can be wrong with the input is found before the engine sees the request, so a bad
request is a 4xx and queues nothing; a streamed request has passed every check before its first byte.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from frugal.engine.async_engine import EngineError, GenerateRequest
from frugal.server.errors import bad_request
from frugal.server.protocol import CompletionRequest
from frugal.server.serving_common import (
    SSE_DONE, ActiveRequest, ChoiceState, ServingContext, SSEResponse, check_unsupported, collect_until_disconnect,
    completion_logprobs, engine_error, sampling_params, sse, sse_error, usage,
)


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # one prompt as token ids
    return list(prompt)


def _check_unsupported(body: CompletionRequest) -> None:
    check_unsupported(body)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request(f"best_of must equal n ({body.n}) when set; got {body.best_of}", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")


async def create_completion(ctx: ServingContext, body: CompletionRequest, raw_request: Request) -> Response:
    model = ctx.resolve_model(body.model)
    _check_unsupported(body)
    params = sampling_params(ctx, body, body.max_tokens, body.logprobs)
    prompts = _prompts(body)
    prompt_ids = [await ctx.tokenize(prompt, "prompt") for prompt in prompts]
    for ids in prompt_ids:
        ctx.check_context(len(ids), body.max_tokens)
    echo_texts = [(p if isinstance(p, str) else ctx.engine.tokenizer.decode(p)) if body.echo else ""
                  for p in prompts]

    completion_id = f"cmpl-{uuid.uuid4().hex}"
    request_ids = [f"{completion_id}-{i}" for i in range(len(prompts))]
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    active = await ActiveRequest.start(
        ctx, [GenerateRequest(rid, ids, params) for rid, ids in zip(request_ids, prompt_ids)], num_prompt_tokens)
    prompt_index = {rid: i for i, rid in enumerate(request_ids)}
    choices = [ChoiceState(index=i, prev_token_id=prompt_ids[i // body.n][-1]) for i in range(len(prompts) * body.n)]

    def choice_of(delta) -> ChoiceState:
        return choices[prompt_index[delta.request_id] * body.n + delta.index]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream(ctx, active, body, model, completion_id, choices, choice_of, echo_texts,
                                   num_prompt_tokens, include_usage), active)
    try:
        if not await collect_until_disconnect(raw_request, active, lambda d: choice_of(d).add(d)):
            return Response(status_code=499)  # the client is gone; nobody reads this
    except EngineError as exc:
        raise engine_error(exc) from exc
    finally:
        active.close()
    out_choices = []
    for choice in choices:
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(choice.token_ids, choice.logprobs, choice, ctx.token_texts)
        out_choices.append({
            "index": choice.index, "text": echo_texts[choice.index // body.n] + choice.text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
            "token_ids": choice.token_ids if body.return_token_ids else None,
        })
    return JSONResponse({
        "id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": out_choices, "usage": usage(num_prompt_tokens, choices),
    })


async def _stream(ctx: ServingContext, active: ActiveRequest, body: CompletionRequest, model: str, completion_id: str,
                  choices: list[ChoiceState], choice_of, echo_texts: list[str], num_prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choice_payloads: list[dict], usage_payload: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                   "choices": choice_payloads}
        if include_usage:
            payload["usage"] = usage_payload
        return sse(payload)

    try:
        async for delta in active.deltas():
            choice = choice_of(delta)
            choice.add(delta)
            text = delta.text if choice.started else echo_texts[choice.index // body.n] + delta.text
            wants_tokens = delta.token_ids and (body.logprobs is not None or body.return_token_ids)
            if not (text or delta.finished or wants_tokens):
                continue  # text held back (a possible stop string) and nothing else to say
            choice.started = True
            logprobs = None
            if body.logprobs is not None and delta.logprobs is not None:
                logprobs = completion_logprobs(delta.token_ids, delta.logprobs, choice, ctx.token_texts)
            yield chunk([{
                "index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason, "token_ids": delta.token_ids if body.return_token_ids else None,
            }])
        if include_usage:
            yield chunk([], usage(num_prompt_tokens, choices))
    except EngineError as exc:
        yield sse_error(exc)
    yield SSE_DONE
