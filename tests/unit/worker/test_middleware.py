"""The worker's ASGI middleware, driven with ASGI messages (no server): how requests are counted."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest
from starlette.types import Message, Receive, Scope, Send

from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.middleware import BodySizeLimitMiddleware, RequestContextMiddleware

SCOPE: Scope = {
    "type": "http",
    "method": "POST",
    "path": "/v1/images/generations",
    "headers": [(b"content-length", b"100")],
}


async def never_called(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the app must not run for a request whose body never arrived")


def run(metrics: WorkerMetrics, messages: list[Message]) -> list[Message]:
    """Send `messages` as the client's side of one request; returns what the server sent."""
    app = RequestContextMiddleware(BodySizeLimitMiddleware(never_called, max_bytes=1024), metrics=metrics)
    incoming = iter(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(dict(SCOPE), receive, send))
    return sent


def test_client_gone_mid_body_counts_as_499_not_as_a_server_error(caplog: pytest.LogCaptureFixture) -> None:
    metrics = WorkerMetrics()
    with caplog.at_level(logging.DEBUG):
        sent = run(
            metrics,
            [
                {"type": "http.request", "body": b'{"prompt": "a', "more_body": True},
                {"type": "http.disconnect"},
            ],
        )
    assert sent == [], "nobody is left to answer"
    exposed = generate_latest(metrics.registry).decode()
    assert 'diffusion_worker_requests_total{route="unmatched",status="499"} 1.0' in exposed
    assert 'status="500"' not in exposed
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
