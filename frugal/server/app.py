"""The OpenAI-compatible HTTP app (FastAPI) over one AsyncEngine.

    app = create_app(AsyncEngine(engine_core), ServerConfig(served_model_names=("stories260K",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model},
GET /health, GET /metrics. Middleware, outermost first: metrics (counts every response by endpoint and
status), then the API key check on /v1 when a key is set.

Always true: every error leaves in OpenAI's JSON error shape; malformed JSON, wrong types and values
out of range are 400 (never FastAPI's 422, never a 500); a handler's unexpected exception is a 500
for that request alone and is logged.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from frugal.engine.async_engine import AsyncEngine, EngineError
from frugal.errors import InvalidRequestError
from frugal.server.auth import APIKeyMiddleware
from frugal.server.errors import APIError, error_response
from frugal.server.metrics import MetricsMiddleware, ServerMetrics
from frugal.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ErrorResponse,
    HealthResponse, ModelCard, ModelList,
)
from frugal.server.serving_chat import create_chat_completion
from frugal.server.serving_common import Admission, ServerConfig, ServingContext, TokenTexts, engine_error
from frugal.server.serving_completion import create_completion

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

_ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in (
    (400, "bad input: malformed JSON, wrong types, values out of range, prompt over the context limit"),
    (401, "missing or wrong API key (when the server has one)"),
    (404, "unknown model"),
    (429, "the server's queue is full"),
    (500, "the engine failed while running the request"),
    (503, "the server is shutting down"),
)}


def _sse_or_json(model) -> dict:
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "JSON, or server-sent events when `stream` is true"}, **_ERRORS}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return f"malformed JSON body: {detail.get('ctx', {}).get('error', detail.get('msg'))}", None
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # missing, or not an object
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    parts, param = [], None
    for error in errors[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {error.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param


def create_app(engine: AsyncEngine, config: ServerConfig, owns_engine: bool = True) -> FastAPI:
    """The app; with `owns_engine` its shutdown (after uvicorn's drain) also stops the engine loop."""
    metrics = ServerMetrics(engine)
    ctx = ServingContext(engine, config, metrics, Admission(engine.max_num_seqs, config.max_queue),
                         TokenTexts(engine.tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_engine:
            engine.shutdown()

    app = FastAPI(title="frugal", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.ctx = ctx

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        api_error = engine_error(exc)
        return error_response(api_error.status, api_error.message, code=api_error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_sse_or_json(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=_sse_or_json(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, root=str(engine.model_dir), max_model_len=engine.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(name) for name in config.served_model_names])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(model: str) -> ModelCard:
        return model_card(ctx.resolve_model(model))

    @app.get("/health", response_model=HealthResponse, responses=_ERRORS)
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, "the engine is not running", code="engine_stopped")
        return JSONResponse(HealthResponse().model_dump())

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)
    return app
