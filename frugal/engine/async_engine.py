"""AsyncEngine: EngineCore's step loop on one background thread, streaming deltas to asyncio code.

EngineCore and its Scheduler are not thread-safe, so after construction exactly one thread, the loop
thread, touches them. Other threads hand it commands (add, abort, stop) through a lock-protected
list; the loop applies every pending command between two steps, steps while any request is
unfinished, and sleeps on a condition variable when idle (an add or abort wakes it). A batch of
requests added together (one HTTP request: several prompts, n samples each) owns one
`RequestStream`, whose asyncio.Queue lives on the consumer's event loop and is fed through
`call_soon_threadsafe`, once per step.

Always true:
- `add_requests` either raises (InvalidRequestError, nothing queued) or returns a stream that ends
  with exactly one final CompletionDelta per sequence, or raises EngineError, or was aborted;
- an abort is applied before the next step starts, so the request's KV blocks are free by then;
- an exception inside a step fails the requests in flight at that moment with EngineError, and the
  loop goes on serving new ones; nothing a request does can end the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from frugal.config import EngineConfig
from frugal.engine.engine_core import EngineCore, EngineSnapshot
from frugal.errors import FrugalError, InvalidRequestError
from frugal.outputs import CompletionDelta
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class EngineError(FrugalError):
    """The engine could not finish a request for a reason of its own (a failed step, a shutdown)."""


class EngineStoppedError(EngineError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams


class RequestStream:
    """The deltas of one batch of requests, in the order the engine made them (all sequences of all
    its requests interleaved; `delta.request_id` and `delta.index` tell them apart).

    Iterate it on the event loop that created it. Iteration ends once every sequence has had its
    final delta; call `abort()` (idempotent) when you stop early, e.g. in a `finally`."""

    def __init__(self, engine: "AsyncEngine", request_ids: Sequence[str], num_sequences: int,
                 loop: asyncio.AbstractEventLoop):
        self.request_ids = tuple(request_ids)
        self.num_sequences = num_sequences
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[list[CompletionDelta] | BaseException] = asyncio.Queue()
        self._pending: list[CompletionDelta] = []
        self._num_unfinished = num_sequences       # consumer side
        self.loop_num_unfinished = num_sequences   # loop-thread side
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._closed or self._num_unfinished == 0

    def __aiter__(self) -> AsyncIterator[CompletionDelta]:
        return self

    async def __anext__(self) -> CompletionDelta:
        if self._num_unfinished == 0 or self._closed:
            raise StopAsyncIteration
        while not self._pending:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._closed = True
                raise item
            self._pending = item
        delta = self._pending.pop(0)
        if delta.finished:
            self._num_unfinished -= 1
        return delta

    def abort(self) -> None:
        """Abort every request of this stream that has not finished (a no-op once finished)."""
        if not self.finished:
            self._closed = True
            self._engine.abort(self.request_ids)

    # ---- called by the loop thread ----------------------------------------------------------------

    def deliver(self, item: list[CompletionDelta] | BaseException) -> bool:
        """Hand a step's deltas (or the error that ends the stream) to the consumer's loop. False if
        that loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's event loop is closed
            return False


class AsyncEngine:
    """Drives one EngineCore from a background thread; safe to call from any thread or event loop."""

    def __init__(self, engine: EngineCore, start: bool = True):
        self.engine = engine
        # Immutable after EngineCore's construction: safe to read from any thread.
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        self.generation_defaults = engine.generation_defaults
        self.model_dir = engine.model_dir

        self._cond = threading.Condition()
        self._commands: list[tuple] = []   # guarded by _cond
        self._stopping = False             # guarded by _cond
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._snapshot = engine.snapshot()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(EngineCore(config))

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="frugal-engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop: in-flight requests end with EngineStoppedError, new adds are refused."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("engine loop did not stop within %.1fs", timeout_s)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- the thread-safe API --------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """The engine's load as of the last step or command batch."""
        return self._snapshot

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Prompt token ids, validated (type, id range, context limit). Raises InvalidRequestError.
        Reads only immutable engine state (the tokenizer, vocab size, max_model_len)."""
        return self.engine.tokenize_prompt(prompt)

    async def add_requests(self, requests: Sequence[GenerateRequest]) -> RequestStream:
        """Queue requests together (all or none) and return the stream of their deltas. Raises
        InvalidRequestError for a bad prompt or params, EngineStoppedError while shutting down."""
        if not requests:
            raise InvalidRequestError("no requests to add")
        stream = RequestStream(self, [r.request_id for r in requests], sum(r.params.n for r in requests),
                               asyncio.get_running_loop())
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(("add", list(requests), stream, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            stream.abort()  # the add may still be applied; the abort is queued after it
            raise
        return stream

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[CompletionDelta]:
        """Deltas of one request; aborts it if the consumer stops early."""
        stream = await self.add_requests([GenerateRequest(request_id, prompt, params)])
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.abort()

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); applied before the next step."""
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        self._submit(("abort", tuple(request_ids)))

    def _submit(self, command: tuple) -> None:
        with self._cond:
            if self._stopping and command[0] == "add":
                if command[3].set_running_or_notify_cancel():
                    command[3].set_exception(EngineStoppedError("the server is shutting down"))
                return
            self._commands.append(command)
            self._cond.notify()

    # ---- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for command in commands:
                self._apply(command)
            if stopping:
                self._fail_all(EngineStoppedError("the engine shut down before the request finished"))
                self._snapshot = engine.snapshot()
                with self._cond:  # adds that raced with the stop flag
                    for command in self._commands:
                        if command[0] == "add" and command[3].set_running_or_notify_cancel():
                            command[3].set_exception(EngineStoppedError("the server is shutting down"))
                    self._commands = []
                return
            if engine.has_unfinished_requests():
                self._step()
            else:
                self._snapshot = engine.snapshot()

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, requests, stream, done = command
            if not done.set_running_or_notify_cancel():
                return  # the caller gave up before the add was applied
            try:
                self._add(requests, stream)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, never kills the loop
                done.set_exception(exc)
            else:
                done.set_result(None)
        elif kind == "abort":
            for request_id in command[1]:
                self._streams.pop(request_id, None)
                try:
                    self.engine.abort_request(request_id)
                except Exception:  # noqa: BLE001
                    logger.exception("aborting %s failed", request_id)

    def _add(self, requests: list[GenerateRequest], stream: RequestStream) -> None:
        for request in requests:  # validate every prompt before queueing any
            self.engine.tokenize_prompt(request.prompt)
        added: list[str] = []
        try:
            for request in requests:
                self.engine.add_request(request.request_id, request.prompt, request.params)
                added.append(request.request_id)
                self._streams[request.request_id] = stream
        except BaseException:
            for request_id in added:
                self._streams.pop(request_id, None)
                self.engine.abort_request(request_id)
            raise

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one bad step must not end the loop
            logger.exception("engine step failed; failing the %d in-flight request(s)", len(self._streams))
            self._fail_all(EngineError(f"the engine failed while running this request: {exc!r}"))
            self._snapshot = self.engine.snapshot()
            return
        self._snapshot = self.engine.snapshot()  # before delivery: a consumer that saw its end sees it freed
        batches: dict[int, tuple[RequestStream, list[CompletionDelta]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue  # aborted while the step ran
            batches.setdefault(id(stream), (stream, []))[1].append(delta)
            if delta.finished:
                stream.loop_num_unfinished -= 1
        for stream, batch in batches.values():
            if stream.loop_num_unfinished == 0:
                for request_id in stream.request_ids:
                    self._streams.pop(request_id, None)
            if not stream.deliver(batch):
                self._abort_stream(stream)

    def _abort_stream(self, stream: RequestStream) -> None:
        for request_id in stream.request_ids:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _fail_all(self, error: EngineError) -> None:
        streams = {id(s): s for s in self._streams.values()}
        for stream in streams.values():
            try:
                self._abort_stream(stream)
            except Exception:  # noqa: BLE001
                logger.exception("could not abort %s", stream.request_ids)
            stream.deliver(error)
        self._streams.clear()
