"""Batching, ordering, fairness, cancellation, timeouts and drain, on the real tiny pipeline (and on
stand-in engines where only which engine runs a batch, and when, matters)."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from diffusion_worker.engine import GenerationBatch, KeepGoing, load_engines
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.scheduler import Scheduler
from diffusion_worker.settings import WorkerSettings
from support.engines import ObservedEngine, observed_loader
from support.stand_in import STAND_IN_INFO
from support.worker_server import wait_for_queued_images, worker_process

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]


def batch_of(seeds: list[int], prompt: str = "a red circle", steps: int = 2) -> GenerationBatch:
    return GenerationBatch(
        prompts=[prompt] * len(seeds),
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seeds=seeds,
    )


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Any:
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    return engine


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


async def run_concurrently(scheduler: Scheduler, batches: list[GenerationBatch]) -> list[list[Any]]:
    return list(await asyncio.gather(*(scheduler.generate(b, f"r{i}") for i, b in enumerate(batches))))


def test_batched_images_equal_images_made_alone_and_return_in_order(tiny_engine: Any) -> None:
    requests = [batch_of([11, 12]), batch_of([21], prompt="a blue square"), batch_of([31, 32, 33])]
    alone = [
        tiny_engine.generate(batch_of([seed], prompt=r.prompts[0])) for r in requests for seed in r.seeds
    ]
    observed = ObservedEngine(tiny_engine, gated=False)
    scheduler = Scheduler([observed], max_queue=16, max_batch_size=8, metrics=WorkerMetrics())

    async def scenario() -> list[list[Any]]:
        work = asyncio.ensure_future(run_concurrently(scheduler, requests))
        await asyncio.sleep(0.05)  # all three are queued before the engine thread starts
        scheduler.start()
        return await work

    try:
        results = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [len(r) for r in results] == [2, 1, 3]
    assert [len(b) for b in observed.batches] == [6], "three compatible requests share one pipeline call"
    flat = [image for result in results for image in result]
    for batched, single in zip(flat, alone, strict=True):
        assert np.abs(pixels(batched) - pixels(single)).max() <= 2


def test_incompatible_requests_do_not_share_a_batch(tiny_engine: Any) -> None:
    observed = ObservedEngine(tiny_engine, gated=False)
    scheduler = Scheduler([observed], max_queue=16, max_batch_size=8, metrics=WorkerMetrics())

    async def scenario() -> None:
        work = asyncio.ensure_future(
            run_concurrently(scheduler, [batch_of([1]), batch_of([2], steps=3), batch_of([3])])
        )
        await asyncio.sleep(0.05)
        scheduler.start()
        await work

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [b.seeds for b in observed.batches] == [[1, 3], [2]]


def test_a_large_n_holds_others_back_by_one_batch_at_most(tiny_engine: Any) -> None:
    observed = ObservedEngine(tiny_engine, gated=False)
    scheduler = Scheduler([observed], max_queue=32, max_batch_size=4, metrics=WorkerMetrics())
    big, small = batch_of(list(range(100, 110))), batch_of([7])

    async def scenario() -> None:
        first = asyncio.ensure_future(scheduler.generate(big, "big"))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(scheduler.generate(small, "small"))
        await asyncio.sleep(0.05)
        scheduler.start()
        await asyncio.gather(first, second)

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    assert observed.batches[0].seeds == [100, 101, 102, 103]
    assert 7 in observed.batches[1].seeds, "the small request rides in the second batch"
    assert sorted(s for b in observed.batches for s in b.seeds) == [7, *range(100, 110)]


def test_cancelled_queued_request_never_runs(tiny_engine: Any) -> None:
    observed = ObservedEngine(tiny_engine, gated=True)
    scheduler = Scheduler([observed], max_queue=16, max_batch_size=1, metrics=WorkerMetrics())
    scheduler.start()

    async def scenario() -> None:
        running = asyncio.ensure_future(scheduler.generate(batch_of([1]), "running"))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(scheduler.generate(batch_of([2]), "queued"))
        await asyncio.sleep(0.02)
        assert scheduler.images_admitted == 2
        queued.cancel()
        await asyncio.sleep(0.02)
        assert scheduler.images_admitted == 1, "a cancelled request frees its place in the queue at once"
        observed.gate.set()
        await running

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [b.seeds for b in observed.batches] == [[1]]


class HoldingEngine:
    """A stand-in engine that records which prompts it ran, sets `entered` on each call, and holds a
    batch whose prompt has a gate in `holds` until the test sets it; no pipeline (only which engine
    runs what matters)."""

    info = STAND_IN_INFO

    def __init__(self, name: str, holds: dict[str, threading.Event], entered: threading.Event) -> None:
        self.device = name
        self.holds = holds
        self.prompts: list[str] = []
        self.entered = entered

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.prompts.extend(batch.prompts)
        self.entered.set()
        gate = self.holds.get(batch.prompts[0])
        if gate is not None:
            assert gate.wait(timeout=60), "the test never released the batch"
        return [None] * len(batch)

    def close(self) -> None:
        pass


def test_new_work_reaches_an_idle_engine_while_another_waits_to_fill_its_batch() -> None:
    """A thread waiting to fill its batch (--batch-wait-ms) must not swallow the wakeup meant for
    an idle engine when the new job does not fit its batch. The late job then waits only its own
    batch's 2 s (a swallowed wakeup added the other's 2 s), on either engine: the waiting one stops
    waiting once work its batch cannot take is queued, and may take it next."""
    release_first, entered = threading.Event(), threading.Event()
    engines = [HoldingEngine(name, {"first": release_first}, entered) for name in ("a", "b")]
    scheduler = Scheduler(
        engines, max_queue=16, max_batch_size=2, metrics=WorkerMetrics(), batch_wait_seconds=2.0
    )
    scheduler.start()

    async def scenario() -> None:
        first = asyncio.ensure_future(scheduler.generate(batch_of([1, 2], prompt="first"), "first"))
        assert await asyncio.to_thread(entered.wait, 30)
        (busy,) = [engine for engine in engines if "first" in engine.prompts]
        filling = asyncio.ensure_future(scheduler.generate(batch_of([3], prompt="filling"), "filling"))
        await asyncio.sleep(0.3)  # the other engine takes it and waits to fill its batch
        release_first.set()
        await first
        await asyncio.sleep(0.3)  # the busy engine goes back to waiting for work: now it is idle
        submitted = time.perf_counter()
        late = asyncio.ensure_future(scheduler.generate(batch_of([4], prompt="late", steps=3), "late"))
        await late
        assert time.perf_counter() - submitted < 3.0, "the late job waited out the other's batch wait"
        await filling
        assert any("late" in engine.prompts for engine in engines)
        assert "first" in busy.prompts

    # A slow machine can only make the sleeps above too short, and then the engines find the work
    # without a wakeup: the test would pass, never fail, for that reason.
    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, **{"timeout": 300, **kwargs})


def test_client_disconnect_stops_the_running_batch_and_frees_the_pipeline(
    start_worker: WorkerFactory,
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_inference_steps=200)
    slow = {
        "prompt": "p",
        "size": "256x256",
        "response_format": "b64_json",
        "nvext": {"num_inference_steps": 200},
    }
    with pytest.raises(httpx.ReadTimeout):
        post(url, slow, timeout=httpx.Timeout(120, read=0.5))  # the client gives up and hangs up
    follow_up = post(url, {"prompt": "q", "response_format": "b64_json", "nvext": {"num_inference_steps": 1}})
    assert follow_up.status_code == 200
    assert engines[0].cancelled_calls == 1
    assert engines[0].steps_run[0] < 200, "the abandoned batch stopped between steps"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'diffusion_worker_cancelled_requests_total{reason="client_disconnected"} 1.0' in metrics


def test_request_timeout_gives_504_and_drops_the_work(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True), request_timeout=0.5)
    response = post(url, {"prompt": "p", "response_format": "b64_json"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    engines[0].gate.set()
    deadline = time.monotonic() + 30
    while not engines[0].steps_run and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engines[0].cancelled_calls == 1
    assert (
        'diffusion_worker_cancelled_requests_total{reason="timeout"} 1.0' in httpx.get(f"{url}/metrics").text
    )


def test_an_engine_whose_call_never_returns_leaves_rotation_so_the_pod_restarts(
    start_worker: WorkerFactory,
) -> None:
    """A call held at the gate stands for one that never returns (a driver or GPU fault that
    leaves a kernel spinning). It raised nothing to count, so /health stayed 200 while every
    request timed out, and the kubelet never restarted the pod. Past twice --request-timeout the
    engine leaves rotation, and /health (liveness) and /ready answer 503 device_failed."""
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True), request_timeout=1)
    try:
        assert post(url, {"prompt": "p", "response_format": "b64_json"}).status_code == 504
        assert httpx.get(f"{url}/health").status_code == 200, "within twice the timeout it may still return"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "device_failed"
        assert httpx.get(f"{url}/ready").status_code == 503
        assert "diffusion_worker_engines_in_rotation 0.0" in httpx.get(f"{url}/metrics").text
        refused = post(url, {"prompt": "p", "response_format": "b64_json"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "device_failed"
    finally:
        engines[0].gate.set()  # let the call end: the worker's shutdown does not wait for it, and a
        deadline = time.monotonic() + 30  # thread still in torch at exit aborts the interpreter
        while not engines[0].steps_run and time.monotonic() < deadline:
            time.sleep(0.05)


def test_sigterm_drains_every_accepted_request_then_exits_0(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A real worker process: requests in flight at SIGTERM all get their images."""
    flags = ("--drain-timeout", "600", "--max-batch-size", "1", "--storage-url", f"file://{tmp_path}")
    steps = {"DIFFUSION_WORKER_MAX_INFERENCE_STEPS": "100"}
    with worker_process(tiny_model_dir, *flags, env=steps) as worker:
        process, url = worker.process, worker.url
        body = {"prompt": "p", "size": "64x64", "response_format": "b64_json"}
        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(post, url, {**body, "nvext": {"num_inference_steps": 30, "seed": s}})
                for s in range(3)
            ]
            wait_for_queued_images(url, 3)
            process.send_signal(signal.SIGTERM)
            responses = [future.result(timeout=300) for future in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        for response in responses:
            blob = base64.b64decode(response.json()["data"][0]["b64_json"])
            assert Image.open(io.BytesIO(blob)).size == (64, 64)
        assert process.wait(timeout=60) == 0
        assert "draining" in worker.log()


def test_requests_still_running_when_the_drain_time_runs_out_get_503_error_objects(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A real worker process with --drain-timeout 1 and work that needs far longer: uvicorn cancels
    what is left, and each request gets a 503 error object (not uvicorn's bare text 500); the
    running batch stops at its next step and the process exits 0."""
    flags = ("--drain-timeout", "1", "--max-batch-size", "1", "--storage-url", f"file://{tmp_path}")
    steps = {"DIFFUSION_WORKER_MAX_INFERENCE_STEPS": "1000"}
    with worker_process(tiny_model_dir, *flags, env=steps) as worker:
        process, url = worker.process, worker.url
        body = {"prompt": "p", "size": "256x256", "response_format": "b64_json"}
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(post, url, {**body, "nvext": {"num_inference_steps": 999, "seed": s}})
                for s in range(2)
            ]
            wait_for_queued_images(url, 2)
            process.send_signal(signal.SIGTERM)
            responses = [future.result(timeout=120) for future in futures]
        for response in responses:
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")
            assert "retry on another replica" in error["message"]
        assert process.wait(timeout=60) == 0
        stderr = worker.log()
        assert "cancelled at shutdown; answered 503" in stderr
        assert "Exception in ASGI application" not in stderr
