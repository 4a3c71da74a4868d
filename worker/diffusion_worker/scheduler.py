"""Bounded FIFO of generation work, run by one long-lived thread per engine.

One thread per pipeline (not `asyncio.to_thread` per call): torch's intra-op thread pool is tied to
the calling thread, and DESIGN.md measured 1.12x vs 1.72x overhead over a direct call. A pipeline
object is not re-entrant, so each engine runs one batch at a time; with several engines (data
parallel) batches go to whichever is free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion_worker.engine import Engine, GenerationBatch
from diffusion_worker.logs import request_id_var
from diffusion_worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Admitting the work would exceed --max-queue images."""


class SchedulerClosedError(Exception):
    """The scheduler is shutting down and takes no new work."""


@dataclass
class _Chunk:
    """Part of one request's images that fits in one pipeline call."""

    batch: GenerationBatch
    request_id: str
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.perf_counter)


_STOP = object()


class Scheduler:
    """Admits generation work up to `max_queue` images and runs it FIFO on the engines."""

    def __init__(
        self, engines: Sequence[Engine], *, max_queue: int, max_batch_size: int, metrics: WorkerMetrics
    ) -> None:
        self._engines = list(engines)
        self._max_queue = max_queue
        self._max_batch_size = max_batch_size
        self._metrics = metrics
        self._queue: queue.Queue[_Chunk | object] = queue.Queue()
        self._admitted = 0
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(engine,), name=f"engine-{index}", daemon=True)
            for index, engine in enumerate(self._engines)
        ]

    def start(self) -> None:
        """Start one thread per engine."""
        for thread in self._threads:
            thread.start()

    @property
    def images_admitted(self) -> int:
        """Images queued or running."""
        return self._admitted

    @property
    def saturated(self) -> bool:
        """True when no more images fit: /ready turns false so traffic goes elsewhere."""
        return self._admitted >= self._max_queue

    async def generate(self, batch: GenerationBatch, request_id: str) -> list[Any]:
        """Queue `batch` (split into pipeline-sized chunks) and wait for its images, in order."""
        self._admit(len(batch))
        loop = asyncio.get_running_loop()
        chunks = [
            _Chunk(part, request_id, loop.create_future(), loop)
            for part in split_batch(batch, self._max_batch_size)
        ]
        for chunk in chunks:
            self._queue.put(chunk)
        self._metrics.queue_depth.set(self._admitted)
        try:
            results = await asyncio.gather(*(chunk.future for chunk in chunks))
        finally:
            self._release(len(batch))
        return [image for images in results for image in images]

    def _admit(self, images: int) -> None:
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("the worker is shutting down")
            if self._admitted + images > self._max_queue:
                raise QueueFullError(
                    f"{self._admitted} images are queued or running and this request adds {images}; "
                    f"the limit is {self._max_queue}"
                )
            self._admitted += images

    def _release(self, images: int) -> None:
        with self._lock:
            self._admitted -= images
        self._metrics.queue_depth.set(self._admitted)

    def _run(self, engine: Engine) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Chunk)
            if item.future.cancelled():
                continue
            token = request_id_var.set(item.request_id)
            self._metrics.queue_wait_seconds.observe(time.perf_counter() - item.enqueued_at)
            self._metrics.batch_size.observe(len(item.batch))
            started = time.perf_counter()
            try:
                images = engine.generate(item.batch)
            except BaseException as exc:
                log.exception("generation failed on %s", engine.device)
                item.loop.call_soon_threadsafe(_settle, item.future, None, exc)
            else:
                self._metrics.generation_seconds.observe(time.perf_counter() - started)
                self._metrics.images_generated.inc(len(images))
                item.loop.call_soon_threadsafe(_settle, item.future, images, None)
            finally:
                request_id_var.reset(token)

    def close(self) -> None:
        """Stop taking work, let the threads finish what is queued, and join them."""
        with self._lock:
            self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()


def _settle(future: asyncio.Future[list[Any]], result: list[Any] | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result or [])


def split_batch(batch: GenerationBatch, size: int) -> list[GenerationBatch]:
    """Cut a request's images into pieces of at most `size`, keeping each image's seed."""
    if len(batch) <= size:
        return [batch]
    return [
        dataclasses.replace(
            batch,
            prompts=batch.prompts[start : start + size],
            negative_prompts=None
            if batch.negative_prompts is None
            else batch.negative_prompts[start : start + size],
            seeds=batch.seeds[start : start + size],
        )
        for start in range(0, len(batch), size)
    ]
