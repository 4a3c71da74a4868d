"""--max-queue counts images until the device is done with them, also for requests given up on.

A stand-in engine, no pipeline: what matters is when a batch starts and ends, which a gate decides.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from diffusion_worker.engine import Engine, GenerationBatch, KeepGoing
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.scheduler import QueueFullError, Scheduler
from support.stand_in import STAND_IN_INFO


class GatedEngine:
    """Sets `entered` when a batch starts and holds it until `gate` opens (ignoring keep_going, as
    a pipeline does between two step callbacks)."""

    info = STAND_IN_INFO
    device = "stand-in"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return [None] * len(batch)

    def close(self) -> None:
        pass


def images(n: int) -> GenerationBatch:
    return GenerationBatch(["p"] * n, None, 64, 64, 2, 7.5, list(range(n)))


async def until_idle(scheduler: Scheduler) -> None:
    """Wait (5 s at most) until the scheduler holds no admitted image."""
    for _ in range(500):
        if scheduler.images_admitted == 0:
            return
        await asyncio.sleep(0.01)


def test_a_cancelled_request_keeps_its_running_images_counted_until_the_batch_ends() -> None:
    engine = GatedEngine()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=2, max_batch_size=2, metrics=WorkerMetrics())

    async def scenario() -> None:
        waiter = asyncio.ensure_future(scheduler.generate(images(2), "first"))
        assert await asyncio.to_thread(engine.entered.wait, 10), "the batch never started"
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert scheduler.images_admitted == 2, "the device is still busy with both images"
        with pytest.raises(QueueFullError):
            scheduler.submit(images(1), "second")
        engine.gate.set()
        await until_idle(scheduler)
        assert scheduler.images_admitted == 0, "the ended batch gave its images back"
        assert await scheduler.generate(images(2), "third") == [None, None]

    scheduler.start()
    try:
        asyncio.run(scenario())
    finally:
        engine.gate.set()
        scheduler.close()
    assert scheduler.metrics.registry.get_sample_value("diffusion_worker_queue_images") == 0


def test_a_finished_request_gives_back_every_image() -> None:
    engine = GatedEngine()
    engine.gate.set()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=4, max_batch_size=2, metrics=WorkerMetrics())

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(scheduler.generate(images(2), f"r{i}") for i in range(2))))

    scheduler.start()
    try:
        results = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert results == [[None, None]] * 2
    assert scheduler.images_admitted == 0


QUEUE_GAUGE = "diffusion_worker_queue_images"


def test_the_queue_gauge_is_not_left_stale_by_an_update_that_lands_late() -> None:
    """Before, each thread set the gauge after releasing the scheduler's lock, so an update computed
    first could land last: an idle worker reported images queued, and /ready-based dashboards and
    alerts saw a queue that was not there. Here the waiter's update (2: its images still running)
    is held back until the batch has ended and the engine thread has set 0, as a preempted thread's
    would be."""
    engine = GatedEngine()
    metrics = WorkerMetrics()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=2, max_batch_size=2, metrics=metrics)
    cancelling = threading.Event()
    prompt_set = metrics.queue_depth.set

    def late_set(value: float) -> None:
        if cancelling.is_set() and threading.current_thread() is threading.main_thread():
            engine.gate.set()
            for _ in range(500):
                if scheduler.images_admitted == 0:
                    break
                time.sleep(0.01)
        prompt_set(value)

    metrics.queue_depth.set = late_set  # type: ignore[method-assign]

    async def scenario() -> None:
        waiter = asyncio.ensure_future(scheduler.generate(images(2), "given-up"))
        assert await asyncio.to_thread(engine.entered.wait, 10), "the batch never started"
        cancelling.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        engine.gate.set()
        await until_idle(scheduler)

    scheduler.start()
    try:
        asyncio.run(scenario())
    finally:
        engine.gate.set()
        scheduler.close()
    assert scheduler.images_admitted == 0
    assert metrics.registry.get_sample_value(QUEUE_GAUGE) == 0


def test_after_a_burst_of_finished_and_cancelled_requests_the_gauge_reads_what_the_scheduler_holds() -> None:
    engine = GatedEngine()
    engine.gate.set()
    metrics = WorkerMetrics()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=64, max_batch_size=3, metrics=metrics)

    async def scenario() -> None:
        waiters = [asyncio.ensure_future(scheduler.generate(images(1 + i % 3), f"r{i}")) for i in range(24)]
        await asyncio.sleep(0)
        for waiter in waiters[::3]:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await until_idle(scheduler)

    scheduler.start()
    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    assert scheduler.images_admitted == 0
    assert metrics.registry.get_sample_value(QUEUE_GAUGE) == 0
