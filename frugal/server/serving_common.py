"""What completions and chat share: request -> SamplingParams, admission (the queue bound), the life
of one accepted request, streaming as server-sent events, and logprobs in OpenAI's two shapes.

Always true for an accepted request (`ActiveRequest`): it is closed exactly once, whether it ends
normally, by error, by client disconnect or by cancellation; closing aborts whatever the engine still
runs for it (freeing its KV blocks before the next step), returns its seats to the admission count
and records its metrics.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import StreamingResponse

from frugal.engine.async_engine import AsyncEngine, EngineError, EngineStoppedError, GenerateRequest, RequestStream
from frugal.errors import InvalidRequestError
from frugal.outputs import CompletionDelta, TokenLogprobs
from frugal.sampling_params import SamplingParams
from frugal.server.errors import APIError, bad_request, error_body
from frugal.server.metrics import RequestTracker, ServerMetrics
from frugal.server.protocol import _SamplingFields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Validated once by `frugal serve` (or the caller of create_app)."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_queue: int | None = None        # sequences that may wait beyond the running seats

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty names, got {self.served_model_names!r}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class Admission:
    """The queue bound: the server holds at most `max_num_seqs + max_queue` sequences (every sample
    of every prompt counts) and answers 429 beyond that. Used from one event loop only."""

    def __init__(self, max_num_seqs: int, max_queue: int | None):
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.limit = None if max_queue is None else max_num_seqs + max_queue
        self.num_sequences = 0

    def acquire(self, num_sequences: int) -> "Callable[[], None]":
        """Reserve seats or raise APIError (429 when full; 400 when the request could never fit).
        Returns the release function (idempotent)."""
        if self.limit is not None:
            if num_sequences > self.limit:
                raise bad_request(f"the request needs {num_sequences} sequences (prompts x n) but this server "
                                  f"holds at most {self.limit} (max_num_seqs {self.max_num_seqs} + max_queue "
                                  f"{self.max_queue})", "n")
            if self.num_sequences + num_sequences > self.limit:
                raise APIError(429, f"the server is at capacity ({self.num_sequences} sequences in flight, "
                                    f"limit {self.limit} = max_num_seqs {self.max_num_seqs} + max_queue "
                                    f"{self.max_queue}); retry later", code="queue_full")
        self.num_sequences += num_sequences
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.num_sequences -= num_sequences

        return release


@dataclass
class ServingContext:
    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    admission: Admission
    token_texts: TokenTexts

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            return self.config.served_model_names[0]
        if name not in self.config.served_model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.config.served_model_names))}", "model", "model_not_found")
        return name

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """400 naming the limit when the prompt plus max_tokens cannot fit the context."""
        limit = self.engine.max_model_len
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens; the prompt has {num_prompt_tokens} "
                f"tokens and max_tokens is {max_tokens} ({num_prompt_tokens + max_tokens} in total)", "max_tokens")

    async def tokenize(self, prompt: str | list[int], param: str) -> list[int]:
        """Validated prompt ids; text is tokenized on a worker thread so a huge prompt never stalls
        the event loop (and every other stream with it)."""
        try:
            if isinstance(prompt, str):
                return await asyncio.to_thread(self.engine.tokenize, prompt)
            return self.engine.tokenize(prompt)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), param) from exc


def check_unsupported(body: _SamplingFields) -> None:
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")


def sampling_params(ctx: ServingContext, body: _SamplingFields, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams over the checkpoint's generation_config defaults; 400 on bad values."""
    values = dict(ctx.engine.generation_defaults.sampling_defaults)
    optional = {
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "stop_token_ids": body.stop_token_ids,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    values.update(n=body.n, max_tokens=max_tokens, logprobs=logprobs, stop=body.stop or (),
                  ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
                  include_stop_str_in_output=body.include_stop_str_in_output)
    try:
        return SamplingParams(**values)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), str(exc).split(" ", 1)[0]) from exc


class ActiveRequest:
    """One accepted request: its engine stream, its seats and its metrics; `close()` ends all three."""

    def __init__(self, stream: RequestStream, release: Callable[[], None], tracker: RequestTracker):
        self.stream = stream
        self._release = release
        self.tracker = tracker
        self.error = False

    @classmethod
    async def start(cls, ctx: ServingContext, requests: list[GenerateRequest],
                    num_prompt_tokens: int) -> "ActiveRequest":
        release = ctx.admission.acquire(sum(r.params.n for r in requests))
        try:
            stream = await ctx.engine.add_requests(requests)
        except InvalidRequestError as exc:
            release()
            raise bad_request(str(exc)) from exc
        except EngineStoppedError as exc:
            release()
            raise APIError(503, str(exc), code="shutting_down") from exc
        except BaseException:
            release()
            raise
        return cls(stream, release, ctx.metrics.track(num_prompt_tokens))

    async def deltas(self) -> AsyncIterator[CompletionDelta]:
        try:
            async for delta in self.stream:
                self.tracker.on_delta(delta)
                yield delta
        except EngineError:
            self.error = True
            raise

    def close(self) -> None:
        self.stream.abort()
        self._release()
        self.tracker.close(self.stream.num_sequences, self.error)


async def collect_until_disconnect(request: Request, active: ActiveRequest,
                                   consume: Callable[[CompletionDelta], None]) -> bool:
    """Feed every delta to `consume` until the request finishes (True) or the client goes away
    (False; the caller's `close()` then aborts it)."""

    async def run() -> None:
        async for delta in active.deltas():
            consume(delta)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work in done:
        work.result()  # re-raise an engine error
        return True
    return False


def engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), code="shutting_down")
    return APIError(500, str(exc), code="engine_error")


# ---- server-sent events ---------------------------------------------------------------------------

def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        api_error = engine_error(exc)
        return sse(error_body(api_error.status, api_error.message, code=api_error.code))
    return sse(error_body(500, "internal server error"))


class SSEResponse(StreamingResponse):
    """A text/event-stream response that closes its ActiveRequest however the response ends, even when
    the client disconnects before the first chunk (the body generator then never starts)."""

    def __init__(self, content: AsyncIterator[str], active: ActiveRequest):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._active = active

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._active.close()


# ---- per-choice accumulation and logprobs ---------------------------------------------------------

@dataclass
class ChoiceState:
    """What one choice (one sample of one prompt) has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prev_token_id: int | None = None  # the token before the next logprob token (last prompt token first)
    text_offset: int = 0      # characters before this choice's next logprob token (completions)
    started: bool = False     # a chat stream has sent the role chunk

    def add(self, delta: CompletionDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


class TokenTexts:
    """A token's text as it reads after the previous token (SentencePiece drops a word's leading space
    when a piece is decoded alone; OpenAI's logprob tokens keep it). Cached; thread-safe as the
    tokenizer's decode is."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)

    def _text(self, prev_id: int | None, token_id: int) -> str:
        decode = self._tokenizer.decode
        alone = decode([token_id], skip_special_tokens=False)
        if prev_id is None:
            return alone
        before = decode([prev_id], skip_special_tokens=False)
        both = decode([prev_id, token_id], skip_special_tokens=False)
        return both[len(before):] if both.startswith(before) and len(both) > len(before) else alone


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs], state: ChoiceState,
                        texts: TokenTexts) -> dict:
    """OpenAI's legacy completions shape; advances `state.text_offset` and `state.prev_token_id`."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        prev = state.prev_token_id
        text = texts.text(prev, token_id)
        tokens.append(text)
        token_logprobs.append(entry[token_id].logprob)
        top_logprobs.append({texts.text(prev, tid): lp.logprob for tid, lp in
                             sorted(entry.items(), key=lambda item: item[1].rank)})
        text_offset.append(state.text_offset)
        state.text_offset += len(text)
        state.prev_token_id = token_id
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], num_top: int, state: ChoiceState,
                  texts: TokenTexts) -> dict:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and the `num_top` best
    alternatives; advances `state.prev_token_id`."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        prev = state.prev_token_id
        text = texts.text(prev, token_id)
        top = sorted((item for item in entry.items() if item[1].rank <= num_top), key=lambda item: item[1].rank)
        content.append({
            "token": text, "logprob": entry[token_id].logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": texts.text(prev, tid), "logprob": lp.logprob,
                              "bytes": list(texts.text(prev, tid).encode("utf-8"))} for tid, lp in top[:num_top]],
        })
        state.prev_token_id = token_id
    return {"content": content}


def usage(num_prompt_tokens: int, choices: list[ChoiceState]) -> dict:
    num_completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}
