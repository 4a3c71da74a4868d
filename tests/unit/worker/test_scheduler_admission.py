"""Admission under load: room held for a large request, Retry-After from the backlog, batches that
do not hold the engine while other work waits, and a large request that keeps its place.

A stand-in engine, no pipeline: what matters is how long a batch takes and what goes into it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from diffusion_worker.engine import Engine, GenerationBatch, KeepGoing
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.scheduler import QueueFullError, Scheduler
from support.stand_in import STAND_IN_INFO


class TimedEngine:
    """Takes `seconds_per_image` per image of a batch and records each batch's sizes and seeds."""

    info = STAND_IN_INFO
    device = "stand-in"

    def __init__(self, seconds_per_image: float) -> None:
        self.seconds_per_image = seconds_per_image
        self.batches: list[list[tuple[int, int, int]]] = []  # (width, height, seed) per image
        self.gate = threading.Event()
        self.gate.set()

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        assert self.gate.wait(timeout=30)
        self.batches.append([(batch.width, batch.height, seed) for seed in batch.seeds])
        time.sleep(self.seconds_per_image * len(batch))
        return [None] * len(batch)

    def close(self) -> None:
        pass


def images(n: int, size: int = 64, seed: int = 0) -> GenerationBatch:
    return GenerationBatch(["p"] * n, None, size, size, 2, 7.5, list(range(seed, seed + n)))


def run(scheduler: Scheduler, scenario: Any) -> Any:
    scheduler.start()
    try:
        return asyncio.run(scenario())
    finally:
        scheduler.close()


def test_a_request_of_several_images_gets_in_under_steady_load() -> None:
    """Clients of one image each kept the queue near full, so a request of 8 (--max-queue 8) never
    found room: it was refused for as long as the load lasted. Room is now held for it."""
    engine = TimedEngine(0.01)
    scheduler = Scheduler(list[Engine]([engine]), max_queue=8, max_batch_size=4, metrics=WorkerMetrics())

    async def scenario() -> tuple[bool, int]:
        stop = asyncio.Event()

        async def small_client(index: int) -> None:
            while not stop.is_set():
                try:
                    await scheduler.generate(images(1, seed=index), f"small-{index}")
                except QueueFullError:
                    await asyncio.sleep(0.005)

        clients = [asyncio.ensure_future(small_client(i)) for i in range(8)]
        await asyncio.sleep(0.2)
        refusals = 0
        admitted = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                await scheduler.generate(images(8, seed=100), "large")
                admitted = True
                break
            except QueueFullError:
                refusals += 1
                await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*clients)
        return admitted, refusals

    admitted, refusals = run(scheduler, scenario)
    assert admitted, f"the request of 8 was refused {refusals} times in 5 s"


def test_held_room_is_given_back_when_the_large_request_stops_asking(monkeypatch: Any) -> None:
    import diffusion_worker.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "RESERVATION_SECONDS", 0.2)
    engine = TimedEngine(0.0)
    engine.gate.clear()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=4, max_batch_size=4, metrics=WorkerMetrics())

    async def scenario() -> None:
        running = asyncio.ensure_future(scheduler.generate(images(2), "running"))
        await asyncio.sleep(0.05)
        try:
            scheduler.submit(images(4), "large")
        except QueueFullError:
            pass
        else:
            raise AssertionError("4 more images fit a queue of 4 holding 2")
        try:
            scheduler.submit(images(1), "small")
        except QueueFullError as refused:
            assert "room is held for a request of 4 images" in str(refused)
        else:
            raise AssertionError("the small request took room held for the large one")
        await asyncio.sleep(0.3)
        job = scheduler.submit(images(1), "small-later")  # the hold lapsed
        engine.gate.set()
        await asyncio.gather(running, scheduler.wait(job))

    run(scheduler, scenario)


def test_a_request_answered_no_longer_counts_towards_the_queue() -> None:
    """The images went back to the waiter before the engine thread gave back their room: for a
    moment after a response (longer on a busy machine) the request still counted, and a client that
    sent its next request then got 429 from an empty worker. The moment is drawn out here: the
    engine thread pauses before it ends the batch."""
    engine = TimedEngine(0.0)
    scheduler = Scheduler(list[Engine]([engine]), max_queue=4, max_batch_size=4, metrics=WorkerMetrics())
    end_batch = scheduler._end_batch

    def end_batch_late(slices: Any) -> None:
        time.sleep(0.5)
        end_batch(slices)

    scheduler._end_batch = end_batch_late  # type: ignore[method-assign]

    async def scenario() -> int:
        await scheduler.generate(images(4), "first")
        admitted = scheduler.images_admitted
        await scheduler.generate(images(4), "next")  # refused with 429 before
        return admitted

    assert run(scheduler, scenario) == 0


def test_retry_after_follows_the_backlog_at_the_measured_speed() -> None:
    """Retry-After was 1 s whatever the backlog: clients came back dozens of times per request."""
    engine = TimedEngine(0.25)
    scheduler = Scheduler(list[Engine]([engine]), max_queue=8, max_batch_size=8, metrics=WorkerMetrics())

    async def scenario() -> int:
        await scheduler.generate(images(4), "timed")  # 0.25 s per image, measured
        engine.gate.clear()
        full = [scheduler.submit(images(4, seed=i), f"full-{i}") for i in (10, 20)]
        try:
            scheduler.submit(images(8), "refused")
        except QueueFullError as refused:
            retry_after = refused.retry_after
        else:
            raise AssertionError("a full queue admitted more")
        engine.gate.set()
        await asyncio.gather(*(scheduler.wait(job) for job in full))
        return retry_after

    # 8 images over the limit at 0.25 s each (a little more, as measured), one engine: 2 s, rounded up.
    assert run(scheduler, scenario) in (2, 3)


def test_the_batch_wait_ends_when_work_the_batch_cannot_take_is_queued() -> None:
    """8 queued requests of 8 sizes and a 300 ms batch wait: each batch sat out the whole wait
    while the engine idled, 2.4 s for 8 tiny batches. The wait is for an otherwise idle engine."""
    engine = TimedEngine(0.001)
    engine.gate.clear()
    scheduler = Scheduler(
        list[Engine]([engine]),
        max_queue=64,
        max_batch_size=4,
        metrics=WorkerMetrics(),
        batch_wait_seconds=0.3,
    )

    async def scenario() -> float:
        jobs = [scheduler.submit(images(1, size=64 + 8 * i), f"r{i}") for i in range(8)]
        started = time.perf_counter()
        engine.gate.set()
        await asyncio.gather(*(scheduler.wait(job) for job in jobs))
        return time.perf_counter() - started

    elapsed = run(scheduler, scenario)
    assert len(engine.batches) == 8
    assert elapsed < 1.2, f"{elapsed:.2f} s: batches waited with other work queued"


def test_a_large_request_that_got_only_the_rooms_leftovers_keeps_its_place() -> None:
    """A request of 12 behind one of 1, batches of 4: its first share (3, what the batch had left)
    sent it behind every request queued after it. Now only a share that fills a batch does (so a
    large request still holds the others back by one batch at most): its next batch is its own."""
    engine = TimedEngine(0.0)
    engine.gate.clear()
    scheduler = Scheduler(list[Engine]([engine]), max_queue=64, max_batch_size=4, metrics=WorkerMetrics())

    async def scenario() -> None:
        jobs = [scheduler.submit(images(1, seed=1000), "first"), scheduler.submit(images(12), "large")]
        jobs += [scheduler.submit(images(1, seed=2000 + i), f"small-{i}") for i in range(6)]
        engine.gate.set()
        await asyncio.gather(*(scheduler.wait(job) for job in jobs))

    run(scheduler, scenario)
    seeds = [[seed for _, _, seed in batch] for batch in engine.batches]
    assert seeds[0] == [1000, 0, 1, 2]
    assert seeds[1] == [3, 4, 5, 6], seeds
    assert seeds[2] == [2000, 2001, 2002, 2003], "then the others: it went behind them"
