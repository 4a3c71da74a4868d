"""How failed requests are counted and logged: the real worker and pipeline, a failure injected into
one pipeline call (support.engines.ObservedEngine.fail_next)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from support.engines import ObservedEngine, observed_loader

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
BODY = {"prompt": "p", "size": "64x64", "response_format": "b64_json", "nvext": {"num_inference_steps": 1}}
PIPELINE_FAILURES = 'diffusion_worker_failed_requests_total{reason="pipeline_error"}'


def failed_pipeline_worker(start_worker: WorkerFactory) -> tuple[str, ObservedEngine]:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False))
    engines[0].fail_next = RuntimeError("boom")
    return url, engines[0]


def counted(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_failed_pipeline_call_is_counted_as_pipeline_error_and_logged_once(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = failed_pipeline_worker(start_worker)
    caplog.set_level(logging.INFO)
    response = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=60)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert counted(url, PIPELINE_FAILURES) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("generation failed on cpu"), errors


def test_a_failed_streamed_request_is_counted_like_a_plain_one(start_worker: WorkerFactory) -> None:
    url, _ = failed_pipeline_worker(start_worker)
    body: dict[str, Any] = {**BODY, "stream": True}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as response:
        text = "".join(response.iter_text())
    assert "event: error" in text and "server_error" in text
    assert counted(url, PIPELINE_FAILURES) == 1
