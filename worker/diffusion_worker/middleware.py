"""ASGI middleware of the worker: request ids and counts, the body size limit, and answers for
requests that the server cancels when its drain time runs out."""

from __future__ import annotations

import asyncio
import logging
import uuid

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffusion_worker.errors import APIError, internal_error
from diffusion_worker.logs import log_failure, request_id_var
from diffusion_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# nginx's "client closed request": what a request is counted as when its client left before any
# answer (the status never reaches a client).
CLIENT_CLOSED_REQUEST = 499


class RequestContextMiddleware:
    """Gives each request an id (logs, X-Request-ID) and counts it by route and status."""

    def __init__(self, app: ASGIApp, metrics: WorkerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status: int | None = None
        raised = False

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            raised = True
            raise
        finally:
            self.metrics.in_flight.dec()
            status_label = str(counted_status(status, raised))
            self.metrics.requests.labels(route=route_of(scope), status=status_label).inc()
            request_id_var.reset(token)


def route_of(scope: Scope) -> str:
    """The route template a request is counted under. The router records the route it ran; a
    request answered before routing (413 from the body limit, 405) is matched here against the
    app's routes, so it is not lumped with unknown paths under "unmatched"."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        for candidate in getattr(router, "routes", ()):
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return str(getattr(route, "path", "unmatched"))


def counted_status(status: int | None, raised: bool) -> int:
    """The status a request is counted under: the one sent; else 500 for an exception, which the
    server answers with a 500; else 499: the app answers every request it finishes, so one that
    ends without an answer had lost its client (gone before its body arrived)."""
    if status is not None:
        return status
    return 500 if raised else CLIENT_CLOSED_REQUEST


class BodySizeLimitMiddleware:
    """Reads request bodies up to `max_bytes`; larger ones get 413 before any handler runs."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"The request body exceeds {self.max_bytes} bytes", code="request_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.info("client disconnected before its request body arrived")
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def shutting_down_error() -> APIError:
    """503 for a request the worker's drain time ran out on."""
    return APIError(
        503,
        "The worker shut down before this request finished (its drain time ran out); "
        "retry on another replica",
        type="service_unavailable",
        code="shutting_down",
    )


class UnhandledFailureMiddleware:
    """The last resort: what no handler answered still gets an OpenAI error object.

    - An exception (a bug): 500 `internal_error`, logged as one line (traceback at DEBUG only).
      Starlette's own handler for `Exception` answers too, but then re-raises, and uvicorn logs
      the traceback; catching it here keeps stack frames out of the default logs.
    - A cancellation: uvicorn waits --drain-timeout for requests in flight, then cancels the rest and
      would answer them with a bare text 500. Cancellation reaches a request task only that way (a
      client that goes away is an `http.disconnect` message), so such a request gets a 503 telling
      the client to retry elsewhere.

    A response already started (a stream) cannot be answered again; the error propagates and the
    server closes the connection.
    """

    def __init__(self, app: ASGIApp, metrics: WorkerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or task is None:
                raise
            task.uncancel()
            self.metrics.failed.labels(reason="shutdown").inc()
            log.warning("%s %s cancelled at shutdown; answered 503", scope["method"], scope["path"])
            await shutting_down_error().response()(scope, receive, send)
        except Exception as exc:
            log_failure(log, f"unexpected error on {scope['method']} {scope['path']}", exc)
            self.metrics.failed.labels(reason="internal_error").inc()
            if started:
                raise
            await internal_error().response()(scope, receive, send)
