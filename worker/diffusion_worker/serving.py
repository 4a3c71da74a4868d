"""Turns a validated images request into generation work: limits, defaults, seeds, storage, response."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from diffusion_worker.encoding import ImageEncoder
from diffusion_worker.engine import DeviceOutOfMemoryError, FlaggedImage, GenerationBatch, ModelInfo
from diffusion_worker.errors import APIError, internal_error, invalid_param
from diffusion_worker.logs import log_failure
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.protocol import (
    CONTENT_TYPES,
    FILE_EXTENSIONS,
    MAX_SEED,
    NVEXT_FIELDS,
    ImageGenerationRequest,
    check_size_for_format,
    format_size,
    image_object,
)
from diffusion_worker.scheduler import PartialSink, QueueFullError, Scheduler, SchedulerClosedError
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.storage import ImageStore, StorageError, StoreItem, image_key

log = logging.getLogger(__name__)

# Retry-After of a 503 out_of_memory (a 429's comes from the scheduler's backlog estimate).
RETRY_AFTER_SECONDS = 1
# On a 502 storage_unavailable: the images are lost, and the official OpenAI clients would retry
# the 5xx twice, three full generations for one call; they honour this header (the store has
# already retried its writes, see storage.WRITE_RETRY_DELAYS).
DO_NOT_RETRY = {"x-should-retry": "false"}
MAX_LOGGED_NAMES = 10
MAX_LOGGED_NAME = 64
# Steps per `quality`, as a multiple of the default step count D (see README); capped at the limit.
QUALITY_STEP_FACTORS: dict[str, float] = {
    "low": 0.25,
    "medium": 0.5,
    "auto": 1.0,
    "standard": 1.0,
    "high": 1.0,
    "hd": 1.5,
    "xhigh": 1.5,
    "max": 2.0,
}
# `quality` as responses report it: OpenAI's response and event types name the level made (low,
# medium, high, xhigh, max); `auto`, and DALL-E's `standard` and `hd`, are request-only names. Each
# maps to the level with the same default step count (see reported_quality for --quality-steps).
REPORTED_QUALITY: dict[str, str] = {"auto": "high", "standard": "high", "hd": "xhigh"}
REPORTED_LEVELS = ("low", "medium", "high", "xhigh", "max")


def reported_quality(quality_steps: dict[str, int]) -> dict[str, str]:
    """Each request-only `quality` -> the level reported for it: its usual one (REPORTED_QUALITY)
    while both run the same steps, else the level nearest in steps (--quality-steps can set them
    apart: with `{"high": 40}` and 20 default steps, `auto` runs 20 and is no longer `high`)."""
    return {
        name: min(
            REPORTED_LEVELS,
            key=lambda level: (abs(quality_steps[level] - quality_steps[name]), level != usual),
        )
        for name, usual in REPORTED_QUALITY.items()
    }


UNSUPPORTED_FIELDS = ("svg", "frame_count", "frame_duration_ms", "complexity")


@dataclass(frozen=True)
class RequestDefaults:
    """Values used when a request leaves them out: settings first, then the model's own."""

    size: tuple[int, int]
    steps: int
    guidance_scale: float
    quality_steps: dict[str, int]
    max_steps: int
    reported_quality: dict[str, str]
    # Why `max_steps` is what it is, for the error message of a request that asks for more.
    max_steps_source: str = "--max-inference-steps"

    @classmethod
    def resolve(cls, settings: WorkerSettings, info: ModelInfo) -> RequestDefaults:
        """Combine settings and model defaults; no step count, default or asked, exceeds the cap:
        --max-inference-steps, or fewer when the model's scheduler cannot run that many."""
        size = info.size_from(settings.default_size, settings.max_pixels) if settings.default_size else None
        cap, source = settings.max_inference_steps, "--max-inference-steps"
        if info.max_steps is not None and info.max_steps < cap:
            cap, source = info.max_steps, f"the most {info.pipeline_class}'s scheduler can run"
            log.info("the model's scheduler runs at most %d steps; requests are capped there", cap)
        steps = settings.default_inference_steps or info.default_steps
        if steps > cap:
            log.warning("default steps %d exceed %s (%d); using %d", steps, source, cap, cap)
            steps = cap
        guidance = settings.default_guidance_scale
        quality_steps = {
            quality: max(1, min(cap, round(steps * factor)))
            for quality, factor in QUALITY_STEP_FACTORS.items()
        }
        for quality, count in (settings.quality_steps or {}).items():
            if count > cap:  # said aloud: a lowered level may now run as many steps as a higher one
                log.warning(
                    "--quality-steps %s: %d exceeds %s (%d); using %d", quality, count, source, cap, cap
                )
            quality_steps[quality] = min(cap, count)
        return cls(
            size=size or info.default_size,
            steps=steps,
            guidance_scale=info.default_guidance_scale if guidance is None else guidance,
            quality_steps=quality_steps,
            max_steps=cap,
            max_steps_source=source,
            reported_quality=reported_quality(quality_steps),
        )


def max_images_per_request(settings: WorkerSettings) -> tuple[int, str]:
    """The largest `n` a request may ask for, and the setting that sets it.

    --max-queue below --max-images-per-request is allowed (the CRD admits it when only maxQueue
    is set, so refusing it at start-up would crash such pods): a request for more images than the
    queue holds could never be admitted, so it gets a 400 naming --max-queue, not a 429 that
    tells the client to retry forever."""
    if settings.max_queue < settings.max_images_per_request:
        log.warning(
            "--max-queue %d is below --max-images-per-request %d: requests may ask for at most %d images",
            settings.max_queue,
            settings.max_images_per_request,
            settings.max_queue,
        )
        return settings.max_queue, "--max-queue: the most images this worker holds at once"
    return settings.max_images_per_request, "--max-images-per-request"


class ImageGenerationService:
    """Serves `POST /v1/images/generations` on top of a scheduler and an image store."""

    def __init__(
        self,
        settings: WorkerSettings,
        info: ModelInfo,
        scheduler: Scheduler,
        store: ImageStore,
        metrics: WorkerMetrics,
        encoder: ImageEncoder,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.metrics = metrics
        self.info = info
        self.scheduler = scheduler
        self.store = store
        self.defaults = RequestDefaults.resolve(settings, info)
        self.served_model_name = settings.effective_served_model_name
        self.max_images = max_images_per_request(settings)

    def build_batch(self, request: ImageGenerationRequest) -> GenerationBatch:
        """Apply limits and defaults; every rejection names the offending parameter."""
        settings = self.settings
        misplaced = sorted(NVEXT_FIELDS.intersection(request.model_extra or {}))
        if misplaced:
            name = misplaced[0]
            raise invalid_param(
                name,
                f"`{name}` is not a top-level parameter; did you mean `nvext.{name}`?",
                code="unknown_parameter",
            )
        if request.model_extra:
            # Names come from the client: repr() keeps newlines and control characters out of the log.
            names = sorted(request.model_extra)
            shown = ", ".join(repr(name[:MAX_LOGGED_NAME]) for name in names[:MAX_LOGGED_NAMES])
            more = f" and {len(names) - MAX_LOGGED_NAMES} more" if len(names) > MAX_LOGGED_NAMES else ""
            log.warning("ignoring unknown request fields: %s%s", shown, more)
        if request.model is not None and request.model != self.served_model_name:
            raise APIError(
                404,
                f"The model {request.model!r} does not exist; this server serves {self.served_model_name!r}",
                param="model",
                code="model_not_found",
            )
        if len(request.prompt) > settings.max_prompt_length:
            raise invalid_param(
                "prompt",
                f"`prompt` has {len(request.prompt)} characters; the limit is {settings.max_prompt_length}",
                code="prompt_too_long",
            )
        self._refuse_unsupported(request)
        n = request.n or 1
        most_images, source = self.max_images
        if n > most_images:
            raise invalid_param(
                "n", f"`n` must be at most {most_images} ({source}), got {n}", code="too_many_images"
            )
        size = self.defaults.size
        if request.size is not None and request.size != "auto":
            size = self.info.size_from(request.size, settings.max_pixels)
        check_size_for_format(size, request.output_format or "png")
        nvext = request.nvext
        steps = self.defaults.quality_steps[request.quality or "auto"]
        guidance = self.defaults.guidance_scale
        negative_prompt = None
        seed = None
        if nvext is not None:
            if nvext.num_inference_steps is not None:
                if nvext.num_inference_steps > self.defaults.max_steps:
                    raise invalid_param(
                        "nvext.num_inference_steps",
                        f"`nvext.num_inference_steps` must be at most {self.defaults.max_steps} "
                        f"({self.defaults.max_steps_source}), got {nvext.num_inference_steps}",
                        code="too_many_steps",
                    )
                steps = nvext.num_inference_steps
            if nvext.guidance_scale is not None:
                guidance = nvext.guidance_scale
            if nvext.negative_prompt:
                if not self.info.supports_negative_prompt:
                    raise invalid_param(
                        "nvext.negative_prompt",
                        f"`nvext.negative_prompt` is not supported by {self.info.pipeline_class}",
                        code="unsupported_parameter",
                    )
                if len(nvext.negative_prompt) > settings.max_prompt_length:
                    raise invalid_param(
                        "nvext.negative_prompt",
                        f"`nvext.negative_prompt` has {len(nvext.negative_prompt)} characters; "
                        f"the limit is {settings.max_prompt_length}",
                        code="prompt_too_long",
                    )
                negative_prompt = nvext.negative_prompt
            seed = nvext.seed
        # Every seed returned must be one a request may send back: seed + n - 1 <= MAX_SEED.
        if seed is None:
            seed = secrets.randbelow(MAX_SEED - n + 2)
        elif seed + n - 1 > MAX_SEED:
            raise invalid_param(
                "nvext.seed",
                f"`nvext.seed` + n - 1 must be at most {MAX_SEED} (image i uses seed + i), "
                f"got {seed} with n={n}",
            )
        return GenerationBatch(
            prompts=[request.prompt] * n,
            negative_prompts=None if negative_prompt is None else [negative_prompt] * n,
            width=size[0],
            height=size[1],
            num_inference_steps=steps,
            guidance_scale=guidance,
            seeds=[seed + index for index in range(n)],
        )

    def _refuse_unsupported(self, request: ImageGenerationRequest) -> None:
        for name in UNSUPPORTED_FIELDS:
            if getattr(request, name) is not None:
                raise invalid_param(
                    name, f"`{name}` is not supported by this server", code="unsupported_parameter"
                )
        if request.background == "transparent":
            raise invalid_param(
                "background",
                "`background` 'transparent' is not supported: diffusion pipelines make opaque images; "
                "use 'auto' or 'opaque'",
                code="unsupported_parameter",
            )
        if request.stream and request.response_format == "url":
            raise invalid_param(
                "response_format",
                "`response_format` 'url' cannot be streamed: streamed events carry b64_json",
                code="unsupported_parameter",
            )

    async def generate(
        self, request: ImageGenerationRequest, request_id: str, request_base_url: str
    ) -> dict[str, Any]:
        """Generate, encode, store (for url), and build the response body."""
        batch = self.build_batch(request)
        images = await self._wait(self._submit(batch, request_id))
        output_format = request.output_format or "png"
        response_format = request.response_format or "url"
        # Encoding, and base64 (7 ms for a 1024x1024 PNG), run in a thread: the PNG writer's numpy
        # and ISA-L work releases the GIL; base64 holds it per image, so the loop gets a turn between.
        # The encoder's own threads, not asyncio's default ones: a stuck upload cannot hold them.
        if response_format == "b64_json":
            texts = await self.encoder.run(
                self._encode_b64, images, output_format, request.output_compression
            )
            data = [image_object("b64_json", text) for text in texts]
        else:
            encoded = await self.encoder.run(self._encode, images, output_format, request.output_compression)
            data = await self._store(
                encoded, output_format, request.effective_user, request_id, request_base_url
            )
        return {
            "created": int(time.time()),
            "data": data,
            **self._echo(request, batch),
            "nvext": {"seeds": batch.seeds},
        }

    def _encode(self, images: list[Any], output_format: str, compression: int | None) -> list[bytes]:
        """The images encoded (blocking); the time goes to diffusion_worker_encode_seconds."""
        started = time.perf_counter()
        blobs = self.encoder.encode(images, output_format, compression)
        self.metrics.encode_seconds.labels(output_format=output_format).observe(time.perf_counter() - started)
        return blobs

    def _encode_b64(self, images: list[Any], output_format: str, compression: int | None) -> list[str]:
        """The images encoded, as base64 text (blocking)."""
        return [
            base64.b64encode(blob).decode("ascii")
            for blob in self._encode(images, output_format, compression)
        ]

    def _echo(self, request: ImageGenerationRequest, batch: GenerationBatch) -> dict[str, Any]:
        """What the response and stream events report about the images."""
        return {
            "size": format_size((batch.width, batch.height)),
            "quality": self.defaults.reported_quality.get(request.quality or "auto", request.quality),
            "output_format": request.output_format or "png",
            "background": "opaque",
            "safety_identifier": request.effective_user,
        }

    def _submit(
        self,
        batch: GenerationBatch,
        request_id: str,
        *,
        partial_images: int = 0,
        on_partial: PartialSink | None = None,
    ) -> Any:
        try:
            return self.scheduler.submit(
                batch, request_id, partial_images=partial_images, on_partial=on_partial
            )
        except QueueFullError as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise APIError(
                429,
                f"The server is at capacity ({exc}); retry after {exc.retry_after}s",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": str(exc.retry_after)},
            ) from exc
        except SchedulerClosedError as exc:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise APIError(
                503, "The server is shutting down; retry on another replica", type="service_unavailable"
            ) from exc

    async def _wait(self, job: Any) -> list[Any]:
        deadline = asyncio.timeout(self.settings.request_timeout)
        try:
            async with deadline:
                images = await self.scheduler.wait(job)
        except TimeoutError as exc:
            if not deadline.expired():  # the pipeline's own (a socket's, say): it failed
                raise self._pipeline_failed() from exc
            self.metrics.cancelled.labels(reason="timeout").inc()
            raise APIError(
                504,
                f"The images were not ready within {self.settings.request_timeout:g}s (--request-timeout); "
                "the work was dropped",
                type="timeout",
                code="request_timeout",
            ) from exc
        except DeviceOutOfMemoryError as exc:
            self.metrics.failed.labels(reason="out_of_memory").inc()
            raise APIError(
                503,
                f"Out of device memory ({exc}); the memory was released. Retry, or ask for a smaller size",
                type="service_unavailable",
                code="out_of_memory",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        except APIError:
            raise  # the scheduler's own answer (e.g. 503 device_failed), as it is
        except Exception as exc:
            raise self._pipeline_failed() from exc
        flagged = sum(isinstance(image, FlaggedImage) for image in images)
        if flagged:
            self.metrics.failed.labels(reason="moderation_blocked").inc()
            raise APIError(
                400,
                f"Your request was rejected by the model's safety checker: it flagged {flagged} of the "
                f"{len(images)} images made, and none is returned. Adjust the prompt and retry",
                type="image_generation_user_error",
                code="moderation_blocked",
            )
        return images

    def _pipeline_failed(self) -> APIError:
        """The answer to a failed pipeline call, counted. Not logged here: the scheduler logged it,
        once per batch, naming the device. The client learns nothing of it (exception text may
        quote paths or weights)."""
        self.metrics.failed.labels(reason="pipeline_error").inc()
        return internal_error()

    def start_stream(
        self, request: ImageGenerationRequest, request_id: str
    ) -> tuple[AsyncIterator[dict[str, Any]], Callable[[], None]]:
        """Admit a streamed request now (so a full queue is still a plain 429); returns its events and
        a function that drops its work (for when the client goes away).

        Events: `image_generation.partial_image` as previews arrive, one `image_generation.completed`
        per image, or one `error` event. Each event's `nvext.image_index` names its image."""
        batch = self.build_batch(request)
        partials: asyncio.Queue[tuple[int, int, Any]] = asyncio.Queue()
        job = self._submit(
            batch,
            request_id,
            # Previews are not safety-checked: a model with a checker streams none (the API allows
            # fewer partial images than asked for).
            partial_images=0 if self.info.has_safety_checker else request.partial_images or 0,
            on_partial=lambda index, partial, image: partials.put_nowait((index, partial, image)),
        )
        waiter: asyncio.Future[list[Any]] = asyncio.ensure_future(self._wait(job))

        def drop_work() -> None:
            waiter.cancel()

        return self._stream_events(request, batch, waiter, partials), drop_work

    async def _stream_events(
        self,
        request: ImageGenerationRequest,
        batch: GenerationBatch,
        waiter: asyncio.Future[list[Any]],
        partials: asyncio.Queue[tuple[int, int, Any]],
    ) -> AsyncIterator[dict[str, Any]]:
        echo = self._echo(request, batch)
        del echo["safety_identifier"]
        output_format = echo["output_format"]

        async def event(kind: str, index: int, image: Any, **fields: Any) -> dict[str, Any]:
            [text] = await self.encoder.run(
                self._encode_b64, [image], output_format, request.output_compression
            )
            return {
                "type": kind,
                "b64_json": text,
                "created_at": int(time.time()),
                **echo,
                **fields,
                "nvext": {"image_index": index, "seed": batch.seeds[index]},
            }

        try:
            # Once the work failed (timeout, out of memory, pipeline error), previews still queued
            # are not sent: the stream ends with the error alone.
            while not waiter.done() or (not partials.empty() and _succeeded(waiter)):
                getter = asyncio.ensure_future(partials.get())
                racing: list[asyncio.Future[Any]] = [getter, waiter]
                try:
                    await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    # The stream was cancelled here (client gone, shutdown): a getter left pending
                    # is a task asyncio later reports as "destroyed but it is pending".
                    getter.cancel()
                    raise
                if not getter.done():
                    getter.cancel()
                    continue
                index, partial_index, image = getter.result()
                yield await event(
                    "image_generation.partial_image", index, image, partial_image_index=partial_index
                )
            images = waiter.result()
            for index, image in enumerate(images):
                usage = {
                    "input_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "output_tokens": 0,
                    "total_tokens": 0,
                }
                yield await event(
                    "image_generation.completed",
                    index,
                    image,
                    usage=usage,
                    safety_identifier=request.effective_user,
                )
        except APIError as exc:
            yield {"type": "error", **exc.body()}
        except Exception as exc:
            log_failure(log, "streamed generation failed", exc)
            self.metrics.failed.labels(reason="internal_error").inc()
            yield {"type": "error", **internal_error().body()}
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _store(
        self, encoded: list[bytes], output_format: str, user: str | None, request_id: str, base_url: str
    ) -> list[dict[str, Any]]:
        extension = FILE_EXTENSIONS[output_format]
        items = [
            (image_key(user, request_id, index, extension), blob, CONTENT_TYPES[output_format])
            for index, blob in enumerate(encoded)
        ]
        try:
            urls = await self._publish(items, base_url)
        except StorageError as exc:
            # The message names --storage-url and quotes the backend (bucket, key id): log only.
            log_failure(log, "storage failed", exc)
            self.metrics.failed.labels(reason="storage").inc()
            raise APIError(
                502,
                "Could not store the generated images; the worker log has the details "
                f"(request id {request_id})",
                type="storage_error",
                code="storage_unavailable",
                headers=DO_NOT_RETRY,
            ) from exc
        return [image_object("url", url) for url in urls]

    async def _publish(self, items: list[StoreItem], base_url: str) -> list[str]:
        """The images' URLs; StorageError on failure and after --storage-timeout (the store then
        drops the upload and removes what it wrote)."""
        timeout = self.settings.storage_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self.store.publish(items, base_url)
        except TimeoutError as exc:
            raise StorageError(
                f"images not stored under {self.store.storage_url} within {timeout:g}s (--storage-timeout)"
            ) from exc


def _succeeded(done: asyncio.Future[Any]) -> bool:
    """Whether a finished future holds a result (not an error, not cancelled)."""
    return not done.cancelled() and done.exception() is None
