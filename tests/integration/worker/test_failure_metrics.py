"""How failed requests are counted and logged: the real worker and pipeline, a failure injected into
one pipeline call (support.engines.ObservedEngine.fail_next), or into every call holding a given
prompt (support.engines.RaisesWhen)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from diffusion_worker.engine import DiffusersEngine
from support.engines import ObservedEngine, RaisesWhen, observed_loader
from support.worker_server import metric_value, post_queued

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
BODY = {"prompt": "p", "size": "64x64", "response_format": "b64_json", "nvext": {"num_inference_steps": 1}}
PIPELINE_FAILURES = 'diffusion_worker_failed_requests_total{reason="pipeline_error"}'


def failed_pipeline_worker(start_worker: WorkerFactory) -> tuple[str, ObservedEngine]:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False))
    engines[0].fail_next = RuntimeError("boom")
    return url, engines[0]


def test_a_failed_pipeline_call_is_counted_as_pipeline_error_and_logged_once(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = failed_pipeline_worker(start_worker)
    caplog.set_level(logging.INFO)
    response = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=60)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert metric_value(url, PIPELINE_FAILURES) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("generation failed on cpu"), errors


def test_a_timeout_raised_by_the_pipeline_is_a_failure_not_the_requests_deadline(
    start_worker: WorkerFactory,
) -> None:
    """A TimeoutError from inside the pipeline (a socket's, say) was taken for --request-timeout:
    504 "not ready within 600s" at once, counted as a cancelled request."""
    url, engine = failed_pipeline_worker(start_worker)
    engine.fail_next = TimeoutError("timed out reading a remote file")
    response = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=60)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert metric_value(url, PIPELINE_FAILURES) == 1
    assert metric_value(url, 'diffusion_worker_cancelled_requests_total{reason="timeout"}') == 0  # never


def test_a_failed_streamed_request_is_counted_like_a_plain_one(start_worker: WorkerFactory) -> None:
    url, _ = failed_pipeline_worker(start_worker)
    body: dict[str, Any] = {**BODY, "stream": True}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as response:
        text = "".join(response.iter_text())
    assert "event: error" in text and "server_error" in text
    assert '"code":"internal_error"' in text, "the code the errors table gives a 500"
    assert metric_value(url, PIPELINE_FAILURES) == 1


def test_a_request_the_pipeline_cannot_take_fails_alone_and_its_batch_mates_get_their_images(
    start_worker: WorkerFactory,
) -> None:
    """It shares a batch with another request's two images; before, all three failed with 500."""
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True), max_batch_size=4)
    real = engines[0].inner
    assert isinstance(real, DiffusersEngine)
    RaisesWhen(real, lambda call: "bad" in call["prompt"])
    fine = {**BODY, "prompt": "fine", "n": 2, "nvext": {"num_inference_steps": 1, "seed": 7}}
    results: dict[str, httpx.Response] = {}
    blocker = post_queued(url, {**BODY, "prompt": "x"}, results, "blocker", queued_after=1)
    assert engines[0].entered.wait(30)  # the engine is busy; the next two requests queue up together
    threads = [
        post_queued(url, {**BODY, "prompt": "bad"}, results, "bad", queued_after=2),
        post_queued(url, fine, results, "fine", queued_after=4),
    ]
    engines[0].gate.set()
    for thread in [blocker, *threads]:
        thread.join(60)
    assert [batch.prompts for batch in engines[0].batches] == [
        ["x"],
        ["bad", "fine", "fine"],
        ["bad"],
        ["fine", "fine"],
    ]
    assert (results["bad"].status_code, results["bad"].json()["error"]["code"]) == (500, "internal_error")
    assert results["fine"].status_code == 200 and results["blocker"].status_code == 200
    alone = httpx.post(f"{url}/v1/images/generations", json=fine, timeout=60)
    images = [[d["b64_json"] for d in response.json()["data"]] for response in (results["fine"], alone)]
    assert images[0] == images[1], "the same images as the request gets when it runs alone"
    assert metric_value(url, PIPELINE_FAILURES) == 1
    assert metric_value(url, "diffusion_worker_isolated_batch_retries_total") == 1
