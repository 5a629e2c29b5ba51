"""`create_app`: the OpenAI-compatible FastAPI application over a `ServingClient`.

Routes: ``GET /health``, ``GET /metrics`` (open), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (an API key when one is set). Bodies are
read here with a size limit (413) and parsed here (400 for malformed JSON, 422 for a body of the
wrong shape), so every refusal has OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elastic_llm.cluster.serving_client import RequestFailedError, ServingClient
from elastic_llm.serve import protocol
from elastic_llm.serve.completions import ClientGoneError, prepare, stream_events, whole_response
from elastic_llm.serve.errors import APIError, error_for_status
from elastic_llm.serve.generation import Admission, Generation
from elastic_llm.serve.metrics import GatewayMetrics
from elastic_llm.serve.settings import GatewaySettings


class GatewayState:
    """What the routes share: the client, limits, the bounded queue, metrics, and whether the
    server is draining (set on SIGTERM: new requests get 503, running ones finish)."""

    def __init__(self, llm: ServingClient, settings: GatewaySettings) -> None:
        self.llm = llm
        self.settings = settings
        self.admission = Admission(settings.max_pending)
        self.metrics = GatewayMetrics(llm.status, lambda: self.admission.pending)
        #: True once the server stops taking requests
        self.draining = False
        self.created = int(time.time())


class _CountResponses:
    """ASGI middleware: count every response by route and status code."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope["path"] if scope["path"] in _ROUTES else "other"
                self.state.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def create_app(llm: ServingClient, settings: GatewaySettings) -> FastAPI:
    """The application; `app.state.gateway` is its `GatewayState`."""
    app = FastAPI(title="elastic_llm", docs_url=None, redoc_url=None, openapi_url=None)
    state = GatewayState(llm, settings)
    app.state.gateway = state
    app.add_middleware(_CountResponses, state=state)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            status = await asyncio.to_thread(llm.status)
        except Exception as exc:  # noqa: BLE001 - the scheduler is unreachable: not healthy
            return JSONResponse(error_for_status(503, f"the cluster is unreachable: {exc}").to_json(),
                                status_code=503)
        ready = sum(r["state"] == "ready" for r in status["replicas"])
        verdict = "draining" if state.draining else ("ok" if ready else "no replica ready")
        return JSONResponse({"status": verdict, "replicas_ready": ready, "pending": state.admission.pending,
                             "queued": status["queued"], "running": status["running"]},
                            status_code=200 if verdict == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, settings)
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        _authorize(request, settings)
        if model_id != settings.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(_model_card(state))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, state, protocol.CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, state, protocol.ChatCompletionRequest)

    return app


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {"id": state.settings.model_name, "object": "model", "created": state.created,
            "owned_by": "elastic_llm", "max_model_len": state.llm.spec.max_position_embeddings}


async def _generate(request: Request, state: GatewayState, schema: type[BaseModel]) -> Response:
    arrived = time.perf_counter()
    settings = state.settings
    _authorize(request, settings)
    if state.draining:
        raise APIError(503, "the server is shutting down", code="draining")
    body = _validate(schema, await _read_json(request, settings.max_body_bytes))
    prepared = await asyncio.to_thread(prepare, body, state.llm, settings)  # type: ignore[arg-type]
    generation = await Generation.start(state.llm, state.admission, prepared.specs)
    state.metrics.prompt_tokens.inc(prepared.prompt_tokens)
    metrics = state.metrics
    if prepared.stream:
        def first() -> None:
            metrics.ttft.observe(time.perf_counter() - arrived)

        events = stream_events(generation, prepared, settings.model_name, settings.disconnect_poll_s,
                               metrics, first)
        async def client_gone(message: object) -> None:  # also before the first event was sent
            if not generation.finished:
                generation.abandon()
                metrics.disconnects.inc()

        return EventSourceResponse(events, ping=15, sep="\n", headers={"Cache-Control": "no-cache"},
                                   client_close_handler_callable=client_gone)
    try:
        result = await whole_response(generation, prepared, settings.model_name, request.is_disconnected,
                                      settings.disconnect_poll_s, metrics)
    except ClientGoneError:
        return Response(status_code=499)  # nobody is listening
    finally:
        if not generation.finished:
            generation.abandon()
    metrics.latency.observe(time.perf_counter() - arrived)
    return JSONResponse(result)


def _authorize(request: Request, settings: GatewaySettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON, refused with 413 past `limit` bytes (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _validate(schema: type[BaseModel], data: Any) -> BaseModel:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or None
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise APIError(422, f"{where or 'body'}: {error['msg']}{more}", param=where, code="invalid_type") from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body.to_json(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_for_status(exc.status_code, message).to_json(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_for_status(500, f"internal error: {type(exc).__name__}").to_json(),
                            status_code=500)

    @app.exception_handler(RequestFailedError)
    async def failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        return JSONResponse(error_for_status(503, f"generation failed: {exc}", "generation_failed").to_json(),
                            status_code=503)
