"""Turns a validated images request into generation work: limits, defaults, seeds, storage, response."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from diffusion_worker.encoding import encode_image
from diffusion_worker.engine import GenerationBatch, ModelInfo
from diffusion_worker.errors import APIError, invalid_param
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.protocol import (
    CONTENT_TYPES,
    MAX_SEED,
    ImageGenerationRequest,
    format_size,
    image_object,
    parse_size,
)
from diffusion_worker.scheduler import QueueFullError, Scheduler, SchedulerClosedError
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.storage import ImageStore, StorageError, image_key

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class RequestDefaults:
    """Values used when a request leaves them out: settings first, then the model's own."""

    size: tuple[int, int]
    steps: int
    guidance_scale: float

    @classmethod
    def resolve(cls, settings: WorkerSettings, info: ModelInfo) -> RequestDefaults:
        """Combine settings and model defaults; a default step count never exceeds the cap."""
        size = (
            parse_size(settings.default_size, max_pixels=settings.max_pixels)
            if settings.default_size
            else None
        )
        steps = settings.default_inference_steps or info.default_steps
        if steps > settings.max_inference_steps:
            log.warning(
                "default steps %d exceed --max-inference-steps %d; using %d",
                steps,
                settings.max_inference_steps,
                settings.max_inference_steps,
            )
            steps = settings.max_inference_steps
        guidance = settings.default_guidance_scale
        return cls(
            size=size or info.default_size,
            steps=steps,
            guidance_scale=info.default_guidance_scale if guidance is None else guidance,
        )


class ImageGenerationService:
    """Serves `POST /v1/images/generations` on top of a scheduler and an image store."""

    def __init__(
        self,
        settings: WorkerSettings,
        info: ModelInfo,
        scheduler: Scheduler,
        store: ImageStore,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.info = info
        self.scheduler = scheduler
        self.store = store
        self.defaults = RequestDefaults.resolve(settings, info)
        self.served_model_name = settings.effective_served_model_name

    def build_batch(self, request: ImageGenerationRequest) -> GenerationBatch:
        """Apply limits and defaults; every rejection names the offending parameter."""
        settings = self.settings
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
        n = request.n or 1
        if n > settings.max_images_per_request:
            raise invalid_param(
                "n", f"`n` must be at most {settings.max_images_per_request}, got {n}", code="too_many_images"
            )
        size = self.defaults.size
        if request.size is not None and request.size != "auto":
            size = parse_size(request.size, max_pixels=settings.max_pixels)
        nvext = request.nvext
        steps = self.defaults.steps
        guidance = self.defaults.guidance_scale
        negative_prompt = None
        seed = None
        if nvext is not None:
            if nvext.num_inference_steps is not None:
                if nvext.num_inference_steps > settings.max_inference_steps:
                    raise invalid_param(
                        "nvext.num_inference_steps",
                        f"`nvext.num_inference_steps` must be at most {settings.max_inference_steps} "
                        f"(--max-inference-steps), got {nvext.num_inference_steps}",
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
        if seed is None:
            seed = secrets.randbelow(MAX_SEED)
        return GenerationBatch(
            prompts=[request.prompt] * n,
            negative_prompts=None if negative_prompt is None else [negative_prompt] * n,
            width=size[0],
            height=size[1],
            num_inference_steps=steps,
            guidance_scale=guidance,
            seeds=[seed + index for index in range(n)],
        )

    async def generate(
        self, request: ImageGenerationRequest, request_id: str, request_base_url: str
    ) -> dict[str, Any]:
        """Generate, encode, store (for url), and build the response body."""
        if request.model_extra:
            log.warning("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
        batch = self.build_batch(request)
        try:
            images = await asyncio.wait_for(
                self.scheduler.generate(batch, request_id), timeout=self.settings.request_timeout
            )
        except TimeoutError as exc:
            self.metrics.cancelled.labels(reason="timeout").inc()
            raise APIError(
                504,
                f"The images were not ready within {self.settings.request_timeout:g}s (--request-timeout); "
                "the work was dropped",
                type="timeout",
                code="request_timeout",
            ) from exc
        except QueueFullError as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise APIError(
                429,
                f"The server is at capacity ({exc}); retry after {RETRY_AFTER_SECONDS}s",
                type="server_overloaded",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        except SchedulerClosedError as exc:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise APIError(
                503, "The server is shutting down; retry on another replica", type="service_unavailable"
            ) from exc
        output_format = request.output_format or "png"
        encoded = await asyncio.to_thread(
            lambda: [encode_image(image, output_format, request.output_compression) for image in images]
        )
        response_format = request.response_format or "url"
        if response_format == "b64_json":
            data = [image_object("b64_json", base64.b64encode(blob).decode("ascii")) for blob in encoded]
        else:
            data = await self._store(encoded, output_format, request.user, request_id, request_base_url)
        return {
            "created": int(time.time()),
            "data": data,
            "size": format_size((batch.width, batch.height)),
            "quality": request.quality or "auto",
            "output_format": output_format,
            "nvext": {"seeds": batch.seeds},
        }

    async def _store(
        self, encoded: list[bytes], output_format: str, user: str | None, request_id: str, base_url: str
    ) -> list[dict[str, Any]]:
        extension = "jpg" if output_format == "jpeg" else output_format
        items = [
            (image_key(user, request_id, index, extension), blob, CONTENT_TYPES[output_format])
            for index, blob in enumerate(encoded)
        ]
        try:
            await asyncio.to_thread(self.store.put_all, items)
            return [image_object("url", self.store.url_for(key, base_url)) for key, _, _ in items]
        except StorageError as exc:
            log.error("storage failed: %s (cause: %r)", exc, exc.__cause__)
            raise APIError(502, str(exc), type="storage_error", code="storage_unavailable") from exc
