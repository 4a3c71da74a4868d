"""An engine whose device keeps failing leaves rotation; with none left the worker says so.

Stand-in engines, no pipeline: what matters is which calls fail, not the images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from diffusion_worker.app import build_app
from diffusion_worker.engine import DeviceOutOfMemoryError, Engine, GenerationBatch, KeepGoing
from diffusion_worker.errors import APIError
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.scheduler import FAILURES_BEFORE_REMOVAL, Scheduler
from diffusion_worker.settings import WorkerSettings
from support.stand_in import STAND_IN_INFO

DEVICE_FAULT = "CUDA error: an illegal memory access was encountered"


class StandInEngine:
    """Call number i (from 1) raises `outcome(i)`, or succeeds after `seconds` when that is None."""

    info = STAND_IN_INFO

    def __init__(self, outcome: Callable[[int], BaseException | None], *, seconds: float = 0.0) -> None:
        self.device = "stand-in"
        self.outcome = outcome
        self.seconds = seconds
        self.calls = 0

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.calls += 1
        error = self.outcome(self.calls)
        if error is not None:
            raise error
        time.sleep(self.seconds)
        return [None] * len(batch)

    def close(self) -> None:
        pass


def broken_device() -> StandInEngine:
    return StandInEngine(lambda _: RuntimeError(DEVICE_FAULT))


def one_image(seed: int) -> GenerationBatch:
    return GenerationBatch(["p"], None, 64, 64, 2, 7.5, [seed])


def scheduler_over(engines: list[StandInEngine]) -> Scheduler:
    return Scheduler(list[Engine](engines), max_queue=64, max_batch_size=1, metrics=WorkerMetrics())


def run_one_by_one(scheduler: Scheduler, count: int) -> list[Any]:
    """Each request after the previous one finished; results or the errors they raised."""

    async def scenario() -> list[Any]:
        outcomes: list[Any] = []
        for seed in range(count):
            try:
                outcomes.append(await scheduler.generate(one_image(seed), f"r{seed}"))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    scheduler.start()
    try:
        return asyncio.run(scenario())
    finally:
        scheduler.close()


def test_an_engine_that_fails_every_call_leaves_rotation_while_the_other_keeps_serving() -> None:
    """The reviewer's case: without removal the broken engine, fast to fail and so first back at the
    queue, took most of the 30 requests (24 failed)."""
    broken, healthy = broken_device(), StandInEngine(lambda _: None, seconds=0.05)
    scheduler = scheduler_over([broken, healthy])

    async def scenario() -> list[Any]:
        waiting = []
        for seed in range(30):
            waiting.append(asyncio.ensure_future(scheduler.generate(one_image(seed), f"r{seed}")))
            await asyncio.sleep(0.02)
        return list(await asyncio.gather(*waiting, return_exceptions=True))

    scheduler.start()
    try:
        outcomes = asyncio.run(scenario())
    finally:
        scheduler.close()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == broken.calls <= FAILURES_BEFORE_REMOVAL
    assert all(DEVICE_FAULT in str(error) for error in failed), "the failing batch's jobs fail as before"
    assert scheduler.engines_in_rotation == 1


def test_a_success_between_failures_keeps_an_engine_in_rotation() -> None:
    """Failures one short of the limit, then a success, again and again: the count starts over."""
    k = FAILURES_BEFORE_REMOVAL
    succeeds_every_kth_call = StandInEngine(lambda call: None if call % k == 0 else RuntimeError())
    scheduler = scheduler_over([succeeds_every_kth_call])
    outcomes = run_one_by_one(scheduler, 4 * k)
    assert succeeds_every_kth_call.calls == 4 * k, "it never stopped taking batches"
    assert scheduler.engines_in_rotation == 1
    assert [outcome == [None] for outcome in outcomes] == ([False] * (k - 1) + [True]) * 4


def test_running_out_of_memory_does_not_take_an_engine_out_of_rotation() -> None:
    """Out of memory is the request's size, not a broken device: it has its own split-and-learn path."""
    always_out_of_memory = StandInEngine(lambda _: DeviceOutOfMemoryError("cuda ran out of memory"))
    scheduler = scheduler_over([always_out_of_memory])
    outcomes = run_one_by_one(scheduler, FAILURES_BEFORE_REMOVAL + 2)
    assert all(isinstance(o, DeviceOutOfMemoryError) for o in outcomes)
    assert scheduler.engines_in_rotation == 1


def test_when_the_last_engine_leaves_queued_requests_fail_at_once_with_503_and_new_ones_are_refused() -> None:
    broken = broken_device()
    scheduler = scheduler_over([broken])
    queued = FAILURES_BEFORE_REMOVAL + 3

    async def scenario() -> list[Any]:
        waiting = [scheduler.generate(one_image(seed), f"r{seed}") for seed in range(queued)]
        work = asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.sleep(0.05)  # all queued before the engine's thread starts
        scheduler.start()
        outcomes = list(await asyncio.wait_for(work, timeout=30))
        with pytest.raises(APIError) as refused:
            scheduler.submit(one_image(99), "late")
        assert refused.value.status_code == 503
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        scheduler.close()
    ran, stranded = outcomes[:FAILURES_BEFORE_REMOVAL], outcomes[FAILURES_BEFORE_REMOVAL:]
    assert broken.calls == FAILURES_BEFORE_REMOVAL
    assert all(DEVICE_FAULT in str(error) for error in ran)
    assert all(isinstance(error, APIError) for error in stranded)
    assert {(error.status_code, error.code) for error in stranded} == {(503, "device_failed")}
    assert scheduler.engines_in_rotation == 0
    assert scheduler.images_admitted == 0
    sample = scheduler.metrics.registry.get_sample_value
    assert sample("diffusion_worker_engines_in_rotation") == 0
    assert sample("diffusion_worker_failed_requests_total", {"reason": "device_failed"}) == len(stranded)
    assert sample("diffusion_worker_rejected_requests_total", {"reason": "device_failed"}) == 1


def test_ready_and_health_answer_503_once_no_engine_is_left(tmp_path: Path) -> None:
    """Liveness (the operator probes /health) must fail so the kubelet restarts the pod."""
    settings = WorkerSettings(model="stand-in", storage_url=f"file://{tmp_path}", max_batch_size=1)
    app = build_app(settings, engine_loader=lambda _: [broken_device()])
    body = {"prompt": "p", "response_format": "b64_json"}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert (client.get("/health").status_code, client.get("/ready").status_code) == (200, 200)
        assert "diffusion_worker_engines_in_rotation 1.0" in client.get("/metrics").text
        for _ in range(FAILURES_BEFORE_REMOVAL):
            assert client.post("/v1/images/generations", json=body).status_code == 500
        refused = client.post("/v1/images/generations", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "device_failed")
        for probe in ("/ready", "/health"):
            answer = client.get(probe)
            assert (answer.status_code, answer.json()["error"]["code"]) == (503, "device_failed"), probe
        assert "diffusion_worker_engines_in_rotation 0.0" in client.get("/metrics").text


class RefusesPrompt:
    """A stand-in pipeline that raises for any batch holding `prompt` (an input that slipped past
    validation) and otherwise returns "prompt/seed" per image, so each request's images are known."""

    info = STAND_IN_INFO

    def __init__(self, prompt: str) -> None:
        self.device = "stand-in"
        self.prompt = prompt
        self.batches: list[list[str]] = []

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.batches.append(list(batch.prompts))
        if self.prompt in batch.prompts:
            raise ValueError(f"cannot take {self.prompt!r}")
        return [f"{prompt}/{seed}" for prompt, seed in zip(batch.prompts, batch.seeds, strict=True)]

    def close(self) -> None:
        pass


def run_batched(engine: Any, prompts: list[str]) -> tuple[Scheduler, list[Any]]:
    """One single-image request per prompt, all queued before the engine's thread starts, so they
    share one batch; the scheduler and each request's images or error, in order."""
    scheduler = Scheduler([engine], max_queue=64, max_batch_size=len(prompts), metrics=WorkerMetrics())

    async def scenario() -> list[Any]:
        waiting = [
            scheduler.generate(GenerationBatch([prompt], None, 64, 64, 2, 7.5, [seed]), f"r{seed}")
            for seed, prompt in enumerate(prompts)
        ]
        work = asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.sleep(0.05)
        scheduler.start()
        return list(await asyncio.wait_for(work, timeout=30))

    try:
        return scheduler, asyncio.run(scenario())
    finally:
        scheduler.close()


def test_a_request_that_makes_the_pipeline_raise_fails_alone_and_its_batch_mates_get_their_images() -> None:
    """Before, one bad request failed every request batched with it (500 for all four)."""
    engine = RefusesPrompt("bad")
    scheduler, outcomes = run_batched(engine, ["a", "bad", "c", "d"])
    assert outcomes[0] == ["a/0"] and outcomes[2] == ["c/2"] and outcomes[3] == ["d/3"]
    assert isinstance(outcomes[1], ValueError)
    assert engine.batches == [["a", "bad", "c", "d"], ["a"], ["bad"], ["c"], ["d"]]
    assert scheduler.engines_in_rotation == 1, "the batch-mates' successes show the device works"
    assert scheduler.metrics.registry.get_sample_value("diffusion_worker_isolated_batch_retries_total") == 1


def test_a_broken_device_running_a_batch_alone_per_request_still_leaves_rotation() -> None:
    """Each one-request retry counts; the failures reach the limit within the batch, and the request
    left over is not run on the engine that was just taken out: 503 device_failed."""
    broken = broken_device()
    scheduler, outcomes = run_batched(broken, [f"p{i}" for i in range(FAILURES_BEFORE_REMOVAL + 1)])
    ran, stranded = outcomes[:FAILURES_BEFORE_REMOVAL], outcomes[FAILURES_BEFORE_REMOVAL]
    assert broken.calls == 1 + FAILURES_BEFORE_REMOVAL, "the batch, then one call per request until removal"
    assert all(DEVICE_FAULT in str(error) for error in ran)
    assert isinstance(stranded, APIError) and (stranded.status_code, stranded.code) == (503, "device_failed")
    assert scheduler.engines_in_rotation == 0
    sample = scheduler.metrics.registry.get_sample_value
    assert sample("diffusion_worker_failed_requests_total", {"reason": "device_failed"}) == 1
