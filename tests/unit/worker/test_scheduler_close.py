"""Closing the scheduler while a call never returns: shutdown goes on instead of joining forever.

The hung device is stood in by an engine whose call waits on an event the test only sets at the
end (a CUDA kernel spinning, or a context-parallel rank stopped mid-batch, cannot be made here).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from diffusion_worker.engine import Engine, GenerationBatch, KeepGoing
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.scheduler import Scheduler
from support.stand_in import STAND_IN_INFO


class HungEngine:
    """Its call blocks until `release` is set, whatever keep_going says."""

    info = STAND_IN_INFO

    def __init__(self) -> None:
        self.device = "hung-device"
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.entered.set()
        self.release.wait()
        return [None] * len(batch)

    def close(self) -> None:
        pass


def test_close_gives_up_on_a_call_that_never_returns_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    engine = HungEngine()
    scheduler = Scheduler(
        list[Engine]([engine]),
        max_queue=8,
        max_batch_size=1,
        metrics=WorkerMetrics(),
        hung_after_seconds=0.5,
    )
    scheduler.start()

    async def scenario() -> bool:
        """Whether close() was still joining after a minute; the call is released afterwards."""
        job = scheduler.submit(GenerationBatch(["p"], None, 64, 64, 2, 7.5, [1]), "r1")
        try:
            assert await asyncio.to_thread(engine.entered.wait, 30)
            closing = threading.Thread(target=scheduler.close, daemon=True)
            closing.start()
            await asyncio.to_thread(closing.join, 60)
            return closing.is_alive()
        finally:
            engine.release.set()
            await scheduler.wait(job)

    with caplog.at_level(logging.ERROR, logger="diffusion_worker.scheduler"):
        still_joining = asyncio.run(scenario())
    assert not still_joining, "close() is still joining the hung engine's thread"
    assert "shutting down without engine-0 (hung-device)" in caplog.text
