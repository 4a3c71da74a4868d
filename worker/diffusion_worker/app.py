"""Assembles the FastAPI app: routes, auth, error handlers, request limits, metrics, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffusion_worker import __version__
from diffusion_worker.encoding import ImageEncoder, default_encode_threads
from diffusion_worker.engine import Engine, batch_limit, load_engines
from diffusion_worker.errors import APIError
from diffusion_worker.logs import request_id_var
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.middleware import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    UnhandledFailureMiddleware,
    shutting_down_error,
)
from diffusion_worker.protocol import (
    CONTENT_TYPES,
    FILE_EXTENSIONS,
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    render_json,
)
from diffusion_worker.scheduler import Scheduler, device_failed_error
from diffusion_worker.serving import ImageGenerationService
from diffusion_worker.settings import WorkerSettings, default_storage_url
from diffusion_worker.storage import ImageStore

log = logging.getLogger(__name__)

T = TypeVar("T")
# A stream still running this long before the drain time runs out ends with an error event.
STREAM_DRAIN_MARGIN_SECONDS = 1.0
# A stream with no event for this long gets an SSE comment, so idle-timeout proxies keep it open.
SSE_KEEPALIVE_SECONDS = 15.0
EngineLoader = Callable[[WorkerSettings], list[Engine]]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 502, 503, 504)
}


def image_store(settings: WorkerSettings) -> ImageStore:
    """Where response_format=url images go, as the settings say."""
    return ImageStore(
        settings.storage_url,
        public_base_url=settings.public_base_url,
        url_expiry_seconds=settings.url_expiry_seconds,
        remove_expired=settings.storage_url == default_storage_url(),
        presign_endpoint_url=settings.presign_endpoint_url,
    )


def build_app(settings: WorkerSettings, engine_loader: EngineLoader = load_engines) -> FastAPI:
    """The worker's ASGI app; the model is loaded in its lifespan and released when it ends."""
    metrics = WorkerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engines = await asyncio.to_thread(engine_loader, settings)
        metrics.watch_devices([engine.device for engine in engines])
        scheduler = Scheduler(
            engines,
            max_queue=settings.max_queue,
            max_batch_size=min(batch_limit(engine, settings) for engine in engines),
            metrics=metrics,
            batch_wait_seconds=settings.batch_wait_ms / 1000,
            hung_after_seconds=2 * settings.request_timeout,
        )
        store = image_store(settings)
        encoder = ImageEncoder(settings.encode_threads or default_encode_threads())
        app.state.service = ImageGenerationService(
            settings, engines[0].info, scheduler, store, metrics, encoder
        )
        app.state.scheduler = scheduler
        app.state.store = store
        scheduler.start()
        expiry = asyncio.create_task(store.expire_periodically(metrics.expired_images_removed.inc))
        log.info(
            "serving %r as %r on %s",
            settings.model,
            settings.effective_served_model_name,
            ", ".join(engine.device for engine in engines),
        )
        try:
            yield
        finally:
            expiry.cancel()
            await asyncio.to_thread(scheduler.close)
            encoder.close()
            store.close()
            for engine in engines:
                engine.close()

    app = FastAPI(
        title="diffusion_worker",
        version=__version__,
        description="OpenAI-compatible images API over a Hugging Face diffusers pipeline.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.draining = False
    app.state.drain_deadline = None  # time.monotonic() when uvicorn cancels what is left (server.py)
    install_error_handlers(app)
    app.add_middleware(UnhandledFailureMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    require_key = api_key_dependency(settings)
    metrics_auth = [Depends(require_key)] if settings.api_key_scope in ("api+metrics", "all") else []
    probe_auth = [Depends(require_key)] if settings.api_key_scope == "all" else []

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        dependencies=[Depends(require_key)],
        summary="Create images from a prompt",
    )
    async def create_images(body: ImageGenerationRequest, request: Request) -> Response:
        service: ImageGenerationService = request.app.state.service
        if body.stream:
            events, drop_work = service.start_stream(body, request_id_var.get())
            return StreamingResponse(
                server_sent_events(request, events, drop_work),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        work = service.generate(body, request_id_var.get(), str(request.base_url))
        result = await cancel_on_disconnect(request, work)
        if result is None:
            metrics.cancelled.labels(reason="client_disconnected").inc()
            return Response(status_code=499)  # nobody is listening; the status only reaches the logs
        # On the encoder's threads, member by member (render_json): one json.dumps of ten 2048x2048
        # images on the event loop stalled every request, /health included, for 0.44 s.
        rendered = await service.encoder.run(render_json, result)
        return Response(rendered, media_type=JSONResponse.media_type)

    @app.get("/v1/models", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.effective_served_model_name,
                    "object": "model",
                    "created": app.state.started,
                    "owned_by": "image-diffusion-operator",
                }
            ],
        }

    @app.get("/v1/images/files/{key:path}", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
    async def get_image_file(key: str, request: Request) -> FileResponse:
        store: ImageStore = request.app.state.store
        # Off the event loop: on NFS (file:// storage shared by replicas) a stalled server would
        # otherwise freeze every request, /health included.
        path = await asyncio.to_thread(store.local_file, key) if store.serves_files else None
        if path is None:
            raise APIError(404, f"No image at {key!r}", param="key", code="not_found")
        return FileResponse(path, media_type=_media_type(path.suffix))

    @app.get(
        "/health",
        summary="The process is up and has an engine that works",
        dependencies=probe_auth,
        responses=ERROR_RESPONSES,
    )
    async def health(request: Request) -> JSONResponse:
        # Liveness: with every engine out of rotation only a restart helps (a CUDA error such as an
        # illegal memory access lasts as long as the process). While the model loads it is alive.
        if not has_working_engine(request):
            return device_failed_error().response()
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        summary="The model is loaded and the queue has room",
        dependencies=probe_auth,
        responses=ERROR_RESPONSES,
    )
    async def ready(request: Request) -> JSONResponse:
        scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
        if request.app.state.draining:
            return APIError(503, "The worker is shutting down", type="service_unavailable").response()
        if scheduler is None:
            return APIError(503, "The model is loading", type="service_unavailable").response()
        if not has_working_engine(request):
            return device_failed_error().response()
        if scheduler.saturated:
            full = APIError(503, "The queue is full", type="service_unavailable", code="queue_full")
            return full.response()
        return JSONResponse({"status": "ready", "queued_images": scheduler.images_admitted})

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        dependencies=metrics_auth,
        response_class=PlainTextResponse,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def server_sent_events(
    request: Request, events: AsyncIterator[dict[str, Any]], drop_work: Callable[[], None]
) -> AsyncIterator[bytes]:
    """`event: <type>` / `data: <json>` frames, as the OpenAI streaming API sends them.

    A watcher drops the work as soon as the client disconnects: a generator suspended in `send`
    is not resumed when Starlette stops streaming, so its own clean-up cannot be relied on.
    While no event is due (queued, or `partial_images` 0), an SSE comment every
    SSE_KEEPALIVE_SECONDS keeps proxies with an idle timeout (60 s on an AWS ALB) from cutting the
    stream; clients skip comments. A stream still going STREAM_DRAIN_MARGIN_SECONDS before the
    drain time runs out ends with an `error` event (503 `shutting_down`), as a plain request gets
    that answer, instead of being cut by uvicorn's cancel without a word to the client.
    """

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled():
            metrics_of(request).cancelled.labels(reason="client_disconnected").inc()
            log.info("client disconnected from its stream; its work was dropped")
            drop_work()

    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    watcher.add_done_callback(on_disconnect)
    pending: asyncio.Future[dict[str, Any]] | None = None
    last_write = time.monotonic()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            now = time.monotonic()
            wait = SSE_KEEPALIVE_SECONDS - (now - last_write)
            deadline: float | None = request.app.state.drain_deadline
            if deadline is not None:
                wait = min(wait, deadline - STREAM_DRAIN_MARGIN_SECONDS - now)
                if wait <= 0:
                    drop_work()
                    metrics_of(request).failed.labels(reason="shutdown").inc()
                    log.warning(
                        "stream ended at shutdown (its drain time ran out) with a shutting_down error"
                    )
                    yield _frame({"type": "error", **shutting_down_error().body()})
                    return
            done, _ = await asyncio.wait([pending], timeout=min(max(wait, 0.0), 1.0))
            if not done:
                if time.monotonic() - last_write >= SSE_KEEPALIVE_SECONDS:
                    yield b": keep-alive\n\n"
                    last_write = time.monotonic()
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield _frame(event)
            last_write = time.monotonic()
    finally:
        watcher.cancel()
        if pending is not None and not pending.done():
            pending.cancel()


def has_working_engine(request: Request) -> bool:
    """False once every engine left rotation, after failing call after call or with a call that
    never returned (true while loading)."""
    scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        return True
    scheduler.remove_hung_engines()
    return scheduler.engines_in_rotation > 0


def metrics_of(request: Request) -> WorkerMetrics:
    """The app's metrics."""
    metrics: WorkerMetrics = request.app.state.metrics
    return metrics


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` unless the client goes away first; then cancel it (dropping its queued images)."""
    task = asyncio.ensure_future(work)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # the server gave up on this request (shutdown): its queued images go too
        raise
    finally:
        disconnected.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client disconnected; its work was dropped")
    return None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


MEDIA_TYPES = {f".{FILE_EXTENSIONS[fmt]}": content_type for fmt, content_type in CONTENT_TYPES.items()}


def _media_type(suffix: str) -> str:
    return MEDIA_TYPES.get(suffix, "application/octet-stream")


def api_key_dependency(settings: WorkerSettings) -> Callable[[Request], None]:
    """A dependency that requires `Authorization: Bearer <key>` when --api-key is set."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    def require_api_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected):
            raise APIError(
                401,
                "Missing or invalid API key; send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
            )

    return require_api_key


def install_error_handlers(app: FastAPI) -> None:
    """Every failure, FastAPI's own included, becomes an OpenAI error object (exceptions no handler
    claims are answered by UnhandledFailureMiddleware)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        if exc.status_code >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc.message)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error_to_api_error(exc, request.headers.get("content-type")).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: ("not_found", "Unknown route"), 405: ("method_not_allowed", "Method not allowed")}
        code, message = kinds.get(exc.status_code, ("http_error", str(exc.detail)))
        if exc.status_code == 400:  # FastAPI's only 400: a JSON body its parser raised on
            code, message = "invalid_json", UNPARSABLE_BODY_MESSAGE
        elif exc.status_code in kinds:
            message = f"{message}: {request.method} {request.url.path}"
        # Starlette's 405 carries `Allow` (RFC 9110 requires it); keep it and any other header.
        return APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


# FastAPI answers 400 itself when parsing a JSON body raises other than a JSON syntax error: the
# parser's RecursionError on deep nesting, a body that is not UTF-8.
UNPARSABLE_BODY_MESSAGE = "The request body could not be parsed as JSON (nested too deeply, or not UTF-8)"


def validation_error_to_api_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """First pydantic error -> 400 naming the parameter (`nvext.seed`) and the value received;
    `content_type`, the request's, names what to fix in a body that was never parsed as JSON."""
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    # Only the body itself not being an object is invalid_json; a field that should be one
    # (`nvext: [1]`) is named like any other bad value.
    if error.get("type") == "json_invalid" or (param is None and "input" in error):
        if isinstance(error.get("input"), bytes):
            return unparsed_body_error(content_type)
        return APIError(400, "The request body must be a JSON object", code="invalid_json")
    if error.get("type") == "missing":
        return APIError(400, f"`{param}` is required", param=param, code="missing_required_parameter")
    if error.get("type") == "extra_forbidden":
        return APIError(400, f"`{param}` is not a known parameter", param=param, code="unknown_parameter")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    received = json.dumps(error.get("input"), default=str)[:200]
    return APIError(400, f"`{param}`: {message}, got {received}", param=param, code="invalid_value")


def unparsed_body_error(content_type: str | None) -> APIError:
    """400 invalid_json for a body FastAPI left as bytes: it parses JSON only when the Content-Type
    says so (application/json, application/*+json), so a JSON object sent as text/plain, as curl -d
    sends it (form-urlencoded) or with no Content-Type was refused as not being one."""
    sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return APIError(
        400,
        f"The request body must be JSON sent with `Content-Type: application/json`; it came with {sent}",
        code="invalid_json",
    )
