"""The FastAPI application: routes, OpenAI-shaped errors for everything that goes wrong (no
traceback ever reaches a client), the chat page at `/`, and the engine's life with the app's."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.server.auth import check_api_key
from lmforge.serve.server.errors import APIError, bad_request
from lmforge.serve.server.feedback import feedback_record
from lmforge.serve.server.schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest, parse_body
from lmforge.serve.server.service import ClientGone, Service

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff"}


def chat_page() -> str:
    return (files("lmforge.serve") / "static" / "chat.html").read_text(encoding="utf-8")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes (by its
    Content-Length, or while it streams in when it has none)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"request body is larger than this server's limit of {limit} bytes",
                         "invalid_request_error", None, "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(service: Service) -> FastAPI:
    opts = service.opts

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.engine.start()
        yield
        service.begin_drain()
        drained = await asyncio.to_thread(service.engine.close, opts.drain_s)
        if not drained:
            log.warning("shutdown: requests still running after %.0f s were cut off", opts.drain_s)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        if e.status == 401:
            service.metrics.reject("unauthorized")
        elif e.status == 413:
            service.metrics.reject("too_large")
        elif e.code in ("content_filter", "adversarial_input"):  # refused by the safety screen (guards.py)
            service.metrics.reject(e.code)
        elif e.status in (400, 404) and e.param is not None:
            service.metrics.reject("bad_request")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        body = APIError(e.status_code, str(e.detail), "invalid_request_error", None, kind).body()
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", e.__class__.__name__, e)  # the log, never the response
        return JSONResponse(APIError(500, "internal server error", "server_error", None, "internal_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), opts.api_keys)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(chat_page(), headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "draining" if service.draining else "ok", "breaker": service.breaker.state,
                **service.engine.load()}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.queue_depth.set(service.engine.load()["waiting"])
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": opts.model_name, "object": "model",
                                                          "created": int(time.time()), "owned_by": "lmforge"}]})

    async def generation(request: Request, schema: type) -> Response:
        arrival = service.clock()
        authorize(request)
        body = parse_body(schema, await read_body(request, opts.max_request_bytes))
        prepared = service.prepare(body)  # type: ignore[arg-type]
        await service.screen(prepared)
        req, events = service.admit(prepared, arrival)
        if not prepared.stream:
            try:
                answer = await service.complete(prepared, req, events, request)
                # the server's own arrival-to-answer time: what its deadline is measured against
                return JSONResponse(answer, headers={"X-Request-Seconds": f"{service.clock() - arrival:.4f}"})
            except ClientGone:
                return Response(status_code=499)
        try:
            first = await service.first_events(req, events, request)
        except ClientGone:
            return Response(status_code=499)
        return StreamingResponse(service.stream(prepared, req, events, first, request),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, ChatCompletionRequest)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        authorize(request)
        body = parse_body(FeedbackRequest, await read_body(request, opts.max_request_bytes))
        assert isinstance(body, FeedbackRequest)
        if service.feedback is None:
            raise APIError(404, "this server keeps no feedback (start it with --feedback FILE)",
                           "invalid_request_error", None, "feedback_disabled")
        issued = service.issued.get(body.id)
        if issued is None:
            raise APIError(404, f"no completion '{body.id}' was issued by this server (or it is too old)",
                           "invalid_request_error", "id", "unknown_completion")
        if (body.rating is None) == (body.preferred_choice is None):
            raise bad_request("give exactly one of 'rating' (-1 or 1) and 'preferred_choice'", "rating")
        k = len(issued.choices)
        if body.preferred_choice is not None and (k < 2 or body.preferred_choice >= k):
            raise bad_request(f"preferred_choice = {body.preferred_choice}: the completion has {k} choice(s); "
                              "a preference needs at least 2", "preferred_choice")
        if body.choice >= k:
            raise bad_request(f"choice = {body.choice}: the completion has {k} choice(s)", "choice")
        record = feedback_record(body.id, issued, body.rating, body.choice, body.preferred_choice, body.comment)
        await asyncio.to_thread(service.feedback.append, record)
        return JSONResponse({"id": body.id, "object": "feedback", "stored": True})

    return app
