"""Partial images while a batch is denoised: the predicted clean latent at a step, decoded by the
pipeline's own VAE. Used for `stream: true` with `partial_images`; knows nothing of HTTP.

The tap only reads what the scheduler computes; the latents the pipeline carries on with are not
touched, so the final image is the same with or without previews.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

PreviewSink = Callable[[int, int, Any], None]
"""Called as sink(row, step, pil_image) on the engine thread."""


@dataclass(frozen=True)
class PreviewPlan:
    """Which rows of a batch want a preview after which (1-based) step, and where previews go."""

    rows_at_step: dict[int, list[int]]
    sink: PreviewSink


def preview_steps(total_steps: int, count: int) -> list[int]:
    """Up to `count` evenly spaced steps in 1..total_steps-1 (the last step gives the final image)."""
    steps = {round((index + 1) * total_steps / (count + 1)) for index in range(count)}
    return sorted(step for step in steps if 1 <= step < total_steps)


class CleanLatentTap:
    """Wraps `scheduler.step` for the duration of one pipeline call and keeps the latest x0 estimate.

    Schedulers that return `pred_original_sample` (DDIM, Euler, LMS, ...) give it directly; for flow
    matching x0 = sample - sigma * velocity; otherwise the current latent stands in (noisier).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.latest: Any = None

    def __enter__(self) -> CleanLatentTap:
        original = type(self.scheduler).step.__get__(self.scheduler)

        def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            output = original(model_output, timestep, sample, *args, **kwargs)
            self.latest = self._clean_latent(output, model_output, sample)
            return output

        self.scheduler.step = step
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        del self.scheduler.step

    def _clean_latent(self, output: Any, model_output: Any, sample: Any) -> Any:
        if isinstance(output, tuple):
            if len(output) > 1 and getattr(output[1], "shape", None) == sample.shape:
                return output[1]
        elif getattr(output, "pred_original_sample", None) is not None:
            return output.pred_original_sample
        sigmas = getattr(self.scheduler, "sigmas", None)
        index = getattr(self.scheduler, "step_index", None)
        if "FlowMatch" in type(self.scheduler).__name__ and sigmas is not None and index:
            sigma = sigmas[index - 1].to(sample.device, sample.dtype)
            return sample - sigma * model_output
        return output[0] if isinstance(output, tuple) else getattr(output, "prev_sample", sample)


def decode_latents(pipeline: Any, latents: Any, width: int, height: int) -> list[Any]:
    """Latents of some rows -> PIL images, as the pipeline's own decode would make them."""
    import torch

    vae = pipeline.vae
    if latents.ndim == 3 and hasattr(pipeline, "_unpack_latents"):  # packed (Flux-style) latents
        latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    with torch.inference_mode():
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return list(pipeline.image_processor.postprocess(decoded, output_type="pil"))
