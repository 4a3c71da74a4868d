"""Bounded FIFO of generation jobs, batched and run by one long-lived thread per engine.

One thread per pipeline (not `asyncio.to_thread` per call): torch's intra-op thread pool is tied to
the calling thread, and DESIGN.md measured 1.12x vs 1.72x overhead over a direct call. A pipeline
is not re-entrant, so each engine runs one batch at a time; with several engines (data parallel)
batches go to whichever is free.

Batching: images of different requests share one pipeline call when everything but the prompt and
seed matches (`GenerationBatch.compatibility_key`). Each image keeps its own generator, so it comes
out the same alone or batched. Fairness: a request whose images did not all fit in a batch goes to
the back of the queue, so a large `n` holds others back by one batch at most.

Cancellation: a cancelled request's queued images are dropped at once; a running batch whose every
request is gone stops at its next denoising step.

Out of device memory: a batch of more than one image is retried as two halves (recursively), so
requests that share a batch do not share its fate; only a single image that does not fit fails its
request. The images are the same either way (per-image generators). The scheduler then makes
batches of that size and guidance (`GenerationBatch.memory_key`) at most as large as the larger
half for LEARNED_LIMIT_SECONDS, so later batches do not pay for a failed call each (one that fails
in the VAE decode has run every denoising step first); after that the full size is tried again,
in case memory was short only for a while (fragmentation, another process on the GPU).

Any other failure of a batch holding several requests: each request is run again alone on the same
engine, so a request whose input makes the pipeline raise fails alone and its batch-mates still get
their images (the same images: per-image generators).

A broken device: an engine whose calls fail FAILURES_BEFORE_REMOVAL times in a row (any error but
out of memory or cancellation; a retried batch counts its one-request calls, not itself) leaves
rotation, its thread stops taking batches, so a device that fails in milliseconds no longer wins
most races for the queue. With no engine left, queued and new work fails at once with a 503 and
`/ready` and `/health` answer 503 (the kubelet restarts the pod).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion_worker.engine import DeviceOutOfMemoryError, Engine, GenerationBatch, GenerationCancelledError
from diffusion_worker.errors import APIError
from diffusion_worker.logs import describe_error, log_failure, request_id_var
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.previews import PreviewPlan, preview_steps

log = logging.getLogger(__name__)

LEARNED_LIMIT_SECONDS = 600.0
# Consecutive failed calls that take an engine out of rotation. One failure may be the request (an
# input that slipped past validation, a transient error) and costs only that request; three in a
# row, with no success between, is the device (a sticky CUDA error such as an illegal memory access
# fails every later call in the process) and costs two more calls before the engine stops.
FAILURES_BEFORE_REMOVAL = 3
# Room held for a request refused for its size stays held this long after its last try (a client
# that obeys Retry-After is back well within it; one that gave up frees the room soon after).
RESERVATION_SECONDS = 10.0
# Retry-After bounds, and the seconds per image assumed until a batch has been timed.
MAX_RETRY_AFTER = 60
INITIAL_SECONDS_PER_IMAGE = 1.0
# Weight of the newest batch in the running seconds-per-image estimate.
SECONDS_PER_IMAGE_WEIGHT = 0.2
# How long close() waits for the engines' threads when no hung_after_seconds is given.
CLOSE_WAIT_SECONDS = 60.0

PartialSink = Callable[[int, int, Any], None]
"""Called on the event loop as sink(image_index, partial_image_index, pil_image)."""


class QueueFullError(Exception):
    """Admitting the work would exceed --max-queue images; `retry_after` is whole seconds until
    there is likely room (the backlog over the engines, at the seconds per image seen so far)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosedError(Exception):
    """The scheduler is shutting down and takes no new work."""


def device_failed_error(engines_left: int = 0) -> APIError:
    """503 for work that an engine leaving rotation stranded, or that no engine can run any more.
    An APIError, not a scheduler exception that serving translates, so a job already queued gets it
    too (serving lets APIError through from `wait` as it is)."""
    if engines_left:
        message = (
            f"The device running this request failed {FAILURES_BEFORE_REMOVAL} generations in a row and "
            "was taken out of service before the request ran; retry"
        )
    else:
        message = (
            f"Every device of this worker failed {FAILURES_BEFORE_REMOVAL} generations in a row and was "
            "taken out of service; the worker reports itself unhealthy. Retry on another replica"
        )
    return APIError(503, message, type="service_unavailable", code="device_failed")


@dataclass(eq=False)
class _Job:
    """One request's images, taken into batches piece by piece."""

    batch: GenerationBatch
    request_id: str
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.perf_counter)
    taken: int = 0
    running: int = 0  # images in a batch on an engine right now
    finished: int = 0
    released: bool = False  # the waiter is gone; running images leave the count as their batch ends
    settled: bool = False  # delivered whole to a waiter still there, which frees every image
    results: list[Any] = field(default_factory=list)
    cancelled: bool = False
    started: bool = False
    partial_images: int = 0
    on_partial: PartialSink | None = None
    previews_sent: set[tuple[int, int]] = field(default_factory=set)  # (image index, step)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.batch)

    @property
    def untaken(self) -> int:
        return len(self.batch) - self.taken


@dataclass(frozen=True)
class _Reservation:
    """Room for `images` held for a request refused for its size, until `until` (time.monotonic())."""

    images: int
    until: float


@dataclass(frozen=True)
class _LearnedLimit:
    """At most `images` per batch of one memory key, until `until` (time.monotonic())."""

    images: int
    until: float


@dataclass(eq=False)
class _EngineSlot:
    """An engine, its thread's name (devices repeat on CPU), and whether it still takes batches."""

    engine: Engine
    name: str
    consecutive_failures: int = 0
    in_rotation: bool = True
    hung: bool = False  # its call never returned (remove_hung_engines): its thread is lost
    batch_started: float | None = None  # time.monotonic() of the call running now


@dataclass(frozen=True)
class _Slice:
    """Images start..stop of a job, as part of a batch."""

    job: _Job
    start: int
    stop: int


class Scheduler:
    """Admits generation work up to `max_queue` images and runs it in FIFO batches on the engines."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        max_queue: int,
        max_batch_size: int,
        metrics: WorkerMetrics,
        batch_wait_seconds: float = 0.0,
        learned_limit_seconds: float = LEARNED_LIMIT_SECONDS,
        hung_after_seconds: float | None = None,
    ) -> None:
        self._slots = [_EngineSlot(engine, f"engine-{index}") for index, engine in enumerate(engines)]
        self._max_queue = max_queue
        self._max_batch_size = max_batch_size
        self._learned_limit_seconds = learned_limit_seconds
        self._learned: dict[tuple[Any, ...], _LearnedLimit] = {}
        self._batch_wait_seconds = batch_wait_seconds
        self._hung_after_seconds = hung_after_seconds
        self.metrics = metrics
        self.metrics.engines_in_rotation.set(len(self._slots))
        self._pending: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._admitted = 0
        self._reserved: _Reservation | None = None
        self._seconds_per_image: float | None = None  # of the batches run so far (a running average)
        # Read at each scrape: set() calls made after the lock was released could land out of order
        # (the loop's and an engine thread's) and leave an idle worker reporting images queued.
        self.metrics.queue_depth.set_function(lambda: self._admitted)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(slot,), name=slot.name, daemon=True)
            for slot in self._slots
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
    def engines_in_rotation(self) -> int:
        """Engines still taking batches; 0 means the worker cannot serve (/ready and /health fail)."""
        return sum(slot.in_rotation for slot in self._slots)

    def remove_hung_engines(self) -> None:
        """Take out of rotation each engine whose call has run longer than hung_after_seconds.

        A call that never returns (a GPU fault that leaves a kernel spinning, a driver hang) raises
        nothing for _count_failure to count: its requests timed out one after another while /health
        answered 200, so the pod was never restarted. Its requests' timeouts stop a working call at
        its next step, so a call this old is not coming back. Only engines whose calls can be
        stopped so (ModelInfo.supports_step_callback; not context parallel) are judged. Called by
        the probes (/health, /ready)."""
        if self._hung_after_seconds is None:
            return
        now = time.monotonic()
        removed = []
        with self._condition:
            for slot in self._slots:
                started = slot.batch_started
                # Only a call that a timeout stops at its next step: one that cannot be stopped (context
                # parallel, a pipeline without step callbacks) may run long and still be working.
                stoppable = slot.engine.info.supports_step_callback
                if (
                    stoppable
                    and slot.in_rotation
                    and started is not None
                    and now - started > self._hung_after_seconds
                ):
                    slot.hung = True
                    removed.append((slot, now - started, *self._leave_rotation(slot)))
        for slot, age, left, stranded in removed:
            why = (
                f"its call has run {age:.0f} s, past {self._hung_after_seconds:g} s (twice --request-timeout)"
            )
            self._report_left_rotation(slot, why, left, stranded)

    @property
    def saturated(self) -> bool:
        """True when no more images fit: /ready turns false so traffic goes elsewhere."""
        return self._admitted >= self._max_queue

    async def generate(self, batch: GenerationBatch, request_id: str) -> list[Any]:
        """Queue a request's images and wait for them, in order. Cancelling drops the work."""
        return await self.wait(self.submit(batch, request_id))

    def submit(
        self,
        batch: GenerationBatch,
        request_id: str,
        *,
        partial_images: int = 0,
        on_partial: PartialSink | None = None,
    ) -> _Job:
        """Admit a request's images (QueueFullError / SchedulerClosedError when it cannot be)."""
        loop = asyncio.get_running_loop()
        job = _Job(
            batch,
            request_id,
            loop.create_future(),
            loop,
            partial_images=partial_images,
            on_partial=on_partial,
        )
        with self._condition:
            if self._closed:
                raise SchedulerClosedError("the worker is shutting down")
            if not self.engines_in_rotation:
                self.metrics.rejected.labels(reason="device_failed").inc()
                raise device_failed_error()
            refusal = self._refusal(len(batch))
            if refusal is not None:
                raise QueueFullError(refusal, self._retry_after(len(batch)))
            if self._reserved is not None and len(batch) >= self._reserved.images:
                self._reserved = None  # the request it was held for (or one as large) is in
            self._admitted += len(batch)
            self._pending.append(job)
            # Every waiter, not one: a thread filling its batch (--batch-wait-ms) may take the
            # wakeup, find the job does not fit its batch and leave it, while an idle engine sleeps on.
            self._condition.notify_all()
        return job

    def _refusal(self, images: int) -> str | None:
        """Why `images` more cannot be admitted now, or None. Called with the condition held.

        A request too large for the room left is refused, and room is then held for it: smaller
        requests that would eat into it are refused too, for RESERVATION_SECONDS after its last
        try. Without that, under steady load the queue never drained far enough for a request of
        several images, and it was refused (429) for as long as the load lasted.
        """
        room = self._max_queue - self._admitted
        reserved = self._reserved
        if reserved is not None and time.monotonic() >= reserved.until:
            self._reserved = reserved = None
        if images > room:
            if images > 1:
                held = max(images, reserved.images if reserved is not None else 0)
                self._reserved = _Reservation(held, time.monotonic() + RESERVATION_SECONDS)
            return (
                f"{self._admitted} images are queued or running and this request adds {images}; "
                f"the limit is {self._max_queue}"
            )
        if reserved is not None and images < reserved.images and images > room - reserved.images:
            return (
                f"{self._admitted} images are queued or running; room is held for a request of "
                f"{reserved.images} images refused before (the limit is {self._max_queue})"
            )
        return None

    def _retry_after(self, images: int) -> int:
        """Seconds until `images` more likely fit: the images over the limit, at the seconds per image
        an engine has taken so far, spread over the engines in rotation; 1 to MAX_RETRY_AFTER."""
        excess = self._admitted + images - self._max_queue
        if self._reserved is not None and images < self._reserved.images:
            excess += self._reserved.images
        engines = max(1, self.engines_in_rotation)
        per_image = self._seconds_per_image or INITIAL_SECONDS_PER_IMAGE
        estimate = max(1, excess) * per_image / engines
        return max(1, min(MAX_RETRY_AFTER, math.ceil(estimate)))

    def _note_seconds_per_image(self, seconds: float) -> None:
        known = self._seconds_per_image
        self._seconds_per_image = (
            seconds if known is None else known + SECONDS_PER_IMAGE_WEIGHT * (seconds - known)
        )

    async def wait(self, job: _Job) -> list[Any]:
        """The images of a submitted job, in order. Cancelling the waiter drops the job's work."""
        try:
            return await job.future
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        finally:
            # Images still in a batch on an engine keep counting towards --max-queue until that
            # batch ends (a cancelled one stops at its next step): a client that gives up does not
            # make room for new work while the device is still busy with its images.
            with self._condition:
                job.released = True
                self._admitted -= len(job.batch) - job.running

    def _cancel(self, job: _Job) -> None:
        with self._condition:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
        log.info("request cancelled; %d of its images had not started", job.untaken)

    def _take(self, room: int, key: tuple[Any, ...] | None) -> list[_Slice]:
        """Take up to `room` images of jobs matching `key` (the first job's key when None), FIFO.

        Called with the condition held. A job left with untaken images moves to the back.
        """
        slices: list[_Slice] = []
        keep: deque[_Job] = deque()
        requeue: list[_Job] = []
        offered = room
        while self._pending:
            job = self._pending.popleft()
            if job.cancelled:
                continue
            if room == 0 or (key is not None and job.batch.compatibility_key != key):
                keep.append(job)
                continue
            key = job.batch.compatibility_key
            count = min(room, job.untaken)
            slices.append(_Slice(job, job.taken, job.taken + count))
            job.taken += count
            job.running += count
            room -= count
            if job.untaken:
                # A job that filled a whole batch goes behind the others (a large n holds them back
                # by one batch at most); one that got only what room was left keeps its place.
                (requeue if count == offered else keep).append(job)
        keep.extend(requeue)
        self._pending = keep
        return slices

    def _next_batch(self) -> list[_Slice] | None:
        """Block until work exists (None once closed and drained); optionally wait to fill the batch."""
        with self._condition:
            while not self._pending:
                if self._closed:
                    return None
                self._condition.wait()
            first = next((job for job in self._pending if not job.cancelled), None)
            limit = self._batch_limit(first.batch) if first is not None else self._max_batch_size
            slices = self._take(limit, None)
            if not slices:
                return []
            deadline = time.monotonic() + self._batch_wait_seconds
            size = sum(s.stop - s.start for s in slices)
            key = slices[0].job.batch.compatibility_key
            while size < limit and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._other_work_waits(key):
                    break
                self._condition.wait(remaining)
                more = self._take(limit - size, key)
                slices.extend(more)
                size += sum(s.stop - s.start for s in more)
            return slices

    def _other_work_waits(self, key: tuple[Any, ...]) -> bool:
        """Whether work this batch cannot take is queued: the batch wait is for an idle engine, and
        holding the engine for it then only delays that work. Called with the condition held."""
        return any(not job.cancelled and job.batch.compatibility_key != key for job in self._pending)

    def _batch_limit(self, batch: GenerationBatch) -> int:
        """Most images per batch like `batch`: --max-batch-size, or what running out of memory
        taught for its size and guidance, while that lasts. Called with the condition held."""
        learned = self._learned.get(batch.memory_key)
        if learned is None:
            return self._max_batch_size
        if time.monotonic() >= learned.until:
            del self._learned[batch.memory_key]
            log.info(
                "trying batches of %d %dx%d images again (%g s since one ran out of device memory)",
                self._max_batch_size,
                batch.width,
                batch.height,
                self._learned_limit_seconds,
            )
            return self._max_batch_size
        return learned.images

    def _learn_limit(self, batch: GenerationBatch, images: int) -> int:
        """Batches like `batch` take at most `images` for the next learned_limit_seconds (or fewer,
        if a lower limit is already in force); returns the limit now in force."""
        with self._condition:
            known = self._learned.get(batch.memory_key)
            if known is not None and known.images <= images and time.monotonic() < known.until:
                return known.images
            until = time.monotonic() + self._learned_limit_seconds
            self._learned[batch.memory_key] = _LearnedLimit(images, until)
            return images

    def _run(self, slot: _EngineSlot) -> None:
        while slot.in_rotation:
            slices = self._next_batch()
            if slices is None:
                return
            if slices:
                self._run_batch(slot, slices)

    def _run_batch(self, slot: _EngineSlot, slices: list[_Slice]) -> None:
        now = time.perf_counter()
        for piece in slices:
            if not piece.job.started:
                piece.job.started = True
                self.metrics.queue_wait_seconds.observe(now - piece.job.enqueued_at)
        slot.batch_started = time.monotonic()
        try:
            self._attempt(slot, slices)
        finally:
            slot.batch_started = None
            self._end_batch(slices)

    def _end_batch(self, slices: list[_Slice]) -> None:
        """The batch's images no longer run; those of requests whose waiter is gone leave the count
        (a job settled by `_deliver` is left alone)."""
        with self._condition:
            freed = 0
            for piece in slices:
                if piece.job.settled:
                    continue
                count = piece.stop - piece.start
                piece.job.running -= count
                if piece.job.released:
                    freed += count
            self._admitted -= freed

    def _attempt(self, slot: _EngineSlot, slices: list[_Slice]) -> None:
        """One pipeline call for `slices`. Out of memory with more than one image: two smaller calls.
        Any other failure with more than one request in the batch: a call per request, on this
        engine, so only a request that fails alone fails (those behind one this engine's removal
        stranded get 503 device_failed)."""
        slices = [piece for piece in slices if not piece.job.cancelled]
        if not slices:
            return
        batch = merge_slices([(s.job.batch, s.start, s.stop) for s in slices])
        jobs = list(dict.fromkeys(s.job for s in slices))
        token = request_id_var.set(",".join(dict.fromkeys(job.request_id for job in jobs)))
        self.metrics.batch_size.observe(len(batch))
        started = time.perf_counter()
        try:
            images = slot.engine.generate(
                batch, lambda: any(not job.cancelled for job in jobs), self._preview_plan(slices, batch)
            )
        except GenerationCancelledError:
            log.info("batch of %d stopped: every request in it was cancelled", len(batch))
            return
        except DeviceOutOfMemoryError as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                limit = self._learn_limit(batch, len(batch) - half)
                log.warning(
                    "batch of %d failed: %s; retrying it as batches of %d and %d, and making "
                    "%dx%d images at most %d at a time for the next %g s",
                    len(batch),
                    exc,
                    half,
                    len(batch) - half,
                    batch.width,
                    batch.height,
                    limit,
                    self._learned_limit_seconds,
                )
                self.metrics.out_of_memory_splits.inc()
                parts = list(split_slices(slices, half))
            else:
                log.warning("batch of %d failed: %s", len(batch), exc)  # expected under load: no traceback
                self._fail_jobs(jobs, exc)
                return
        except BaseException as exc:
            log_failure(log, f"generation failed on {slot.engine.device}", exc)
            if len(jobs) == 1:
                self._fail_jobs(jobs, exc)
                self._count_failure(slot, exc)
                return
            log.warning(
                "retrying the failed batch's %d requests one at a time, so only a request at fault fails",
                len(jobs),
            )
            self.metrics.isolated_batch_retries.inc()
            parts = [[piece for piece in slices if piece.job is job] for job in jobs]
        else:
            slot.consecutive_failures = 0
            elapsed = time.perf_counter() - started
            self._note_seconds_per_image(elapsed / len(batch))
            self.metrics.generation_seconds.observe(elapsed)
            self.metrics.images_generated.inc(len(images))
            self._deliver(slices, images)
            return
        finally:
            request_id_var.reset(token)
        # Outside the except block: nothing of the failed call is referenced while the parts run.
        for part in parts:
            if slot.in_rotation:
                self._attempt(slot, part)
            else:  # the parts before, run alone, took it out: the device is at fault, not this part
                self._fail_device_failed(list(dict.fromkeys(piece.job for piece in part)))

    def _count_failure(self, slot: _EngineSlot, error: BaseException) -> None:
        """One more failed call in a row for `slot`; at FAILURES_BEFORE_REMOVAL it leaves rotation.

        Counted per request: a failed batch of several requests is retried one request at a time
        on the same engine (`_attempt`), and each of those calls counts, so one bad request costs a
        failure and its batch-mates' successes reset the run. Nothing is retried on another engine:
        after a failure alone nobody knows whether the request or the device is at fault, and a
        retry elsewhere would spend a second device on work that may be bad and let one bad request
        strike every engine in turn. Removal takes a run of failures with no success between on one
        engine, which is what a broken device does while the other engines keep serving the same
        queue. The price: that many bad requests in a row landing on one engine remove it too."""
        with self._condition:
            slot.consecutive_failures += 1
            if slot.consecutive_failures < FAILURES_BEFORE_REMOVAL or not slot.in_rotation:
                return
            left, stranded = self._leave_rotation(slot)
        why = f"its last {slot.consecutive_failures} generations failed (the last: {describe_error(error)})"
        self._report_left_rotation(slot, why, left, stranded)

    def _leave_rotation(self, slot: _EngineSlot) -> tuple[int, list[_Job]]:
        """Take `slot` out of rotation: the engines left, and (none left) the queue's jobs, taken
        from the queue. Called with the condition held."""
        slot.in_rotation = False
        left = self.engines_in_rotation
        return left, self._drop_pending() if left == 0 else []

    def _report_left_rotation(self, slot: _EngineSlot, why: str, left: int, stranded: list[_Job]) -> None:
        """Log that `slot` left rotation; with none left, fail the stranded jobs (503 device_failed)."""
        self.metrics.engines_in_rotation.set(left)
        log.error(
            "taking %s (%s) out of rotation: %s; %d of %d engines left",
            slot.name,
            slot.engine.device,
            why,
            left,
            len(self._slots),
        )
        if left == 0:
            log.critical(
                "no engine left in rotation: failing %d queued requests with 503; /ready and /health "
                "now answer 503 so the pod is restarted",
                len(stranded),
            )
            self._fail_device_failed(stranded)

    def _fail_device_failed(self, jobs: list[_Job]) -> None:
        """Fail work that an engine leaving rotation stranded: 503 device_failed."""
        if jobs:
            self.metrics.failed.labels(reason="device_failed").inc(len(jobs))
            self._fail_jobs(jobs, device_failed_error(self.engines_in_rotation))

    def _drop_pending(self) -> list[_Job]:
        """Empty the queue, returning its jobs. Called with the condition held."""
        jobs = [job for job in self._pending if not job.cancelled]
        self._pending.clear()
        return jobs

    @staticmethod
    def _fail_jobs(jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            job.cancelled = True
            job.loop.call_soon_threadsafe(_fail, job.future, error)

    def _deliver(self, slices: list[_Slice], images: list[Any]) -> None:
        offset = 0
        for piece in slices:
            count = piece.stop - piece.start
            piece.job.results[piece.start : piece.stop] = images[offset : offset + count]
            offset += count
            with self._condition:
                piece.job.finished += count
                done = piece.job.finished == len(piece.job.batch)
                if done and not piece.job.released:  # the waiter, about to resume, frees them all
                    piece.job.running = 0
                    piece.job.settled = True
            if done:
                piece.job.loop.call_soon_threadsafe(_succeed, piece.job.future, piece.job.results)

    def _preview_plan(self, slices: list[_Slice], batch: GenerationBatch) -> PreviewPlan | None:
        """Rows of this batch that stream partial images, and at which steps."""
        rows_at_step: dict[int, list[int]] = {}
        owners: dict[int, tuple[_Job, int, list[int]]] = {}
        row = 0
        for piece in slices:
            job = piece.job
            steps = preview_steps(batch.num_inference_steps, job.partial_images) if job.on_partial else []
            for index in range(piece.start, piece.stop):
                for step in steps:
                    rows_at_step.setdefault(step, []).append(row)
                owners[row] = (job, index, steps)
                row += 1
        if not rows_at_step:
            return None

        def sink(row: int, step: int, image: Any) -> None:
            job, index, steps = owners[row]
            if job.cancelled or job.on_partial is None or (index, step) in job.previews_sent:
                return  # a batch retried after running out of memory repeats its earlier steps
            job.previews_sent.add((index, step))
            job.loop.call_soon_threadsafe(job.on_partial, index, steps.index(step), image)

        return PreviewPlan(rows_at_step, sink)

    def close(self) -> None:
        """Stop taking work, let the threads finish what is queued, and join them, for at most
        hung_after_seconds (CLOSE_WAIT_SECONDS without it). A call that never returns (a hung device,
        a context-parallel rank stopped mid-batch) held SIGTERM's shutdown for good; the threads
        are daemons, so shutdown goes on without one still in its call then."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        wait = self._hung_after_seconds or CLOSE_WAIT_SECONDS
        deadline = time.monotonic() + wait
        for slot, thread in zip(self._slots, self._threads, strict=True):
            if not thread.is_alive() or slot.hung:  # a call already taken for hung is not waited for
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error(
                    "shutting down without %s (%s): its call has not returned %g s after shutdown began; "
                    "taking it for hung",
                    slot.name,
                    slot.engine.device,
                    wait,
                )


def _succeed(future: asyncio.Future[list[Any]], results: list[Any]) -> None:
    if not future.done():
        future.set_result(results)


def _fail(future: asyncio.Future[list[Any]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def split_slices(slices: list[_Slice], count: int) -> tuple[list[_Slice], list[_Slice]]:
    """The first `count` images of `slices`, and the rest (a slice across the cut is cut in two)."""
    first: list[_Slice] = []
    rest: list[_Slice] = []
    for piece in slices:
        take = max(0, min(count, piece.stop - piece.start))
        if take:
            first.append(_Slice(piece.job, piece.start, piece.start + take))
        if piece.start + take < piece.stop:
            rest.append(_Slice(piece.job, piece.start + take, piece.stop))
        count -= take
    return first, rest


def merge_slices(parts: list[tuple[GenerationBatch, int, int]]) -> GenerationBatch:
    """One batch from compatible pieces of requests: prompts, negative prompts and seeds concatenated."""
    first = parts[0][0]
    negatives = None
    if first.negative_prompts is not None:
        negatives = [p for batch, start, stop in parts for p in (batch.negative_prompts or [])[start:stop]]
    return dataclasses.replace(
        first,
        prompts=[p for batch, start, stop in parts for p in batch.prompts[start:stop]],
        negative_prompts=negatives,
        seeds=[s for batch, start, stop in parts for s in batch.seeds[start:stop]],
    )
