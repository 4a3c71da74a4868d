"""Partial images while a batch is denoised: the predicted clean latent at a step, decoded by the
pipeline's own VAE. Used for `stream: true` with `partial_images`; knows nothing of HTTP.

The tap only reads what the scheduler computes; the latents the pipeline carries on with are not
touched, so the final image is the same with or without previews.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

PreviewSink = Callable[[int, int, Any], None]
"""Called as sink(row, step, pil_image) on the engine thread."""

# Multistep solvers keep the model output of each step, converted, in `model_outputs`; with these
# algorithm types (diffusers' DPMSolver multistep/singlestep, EDM DPMSolver, SA-Solver) that is x0.
CLEAN_LATENT_ALGORITHM_TYPES = frozenset({"dpmsolver++", "sde-dpmsolver++", "data_prediction"})


class PreviewUnavailableError(RuntimeError):
    """The pipeline's latents cannot be decoded into a preview (video latents, say)."""


@dataclass(frozen=True)
class PreviewPlan:
    """Which rows of a batch want a preview after which (1-based) step, and where previews go."""

    rows_at_step: dict[int, list[int]]
    sink: PreviewSink


def preview_steps(total_steps: int, count: int) -> list[int]:
    """Up to `count` evenly spaced steps in 1..total_steps-1 (the last step gives the final image)."""
    steps = {round((index + 1) * total_steps / (count + 1)) for index in range(count)}
    return sorted(step for step in steps if 1 <= step < total_steps)


def predicted_clean_latent(scheduler: Any, model_output: Any, timestep: Any, sample: Any) -> Any:
    """x0 from what a variance-preserving scheduler's `step` was given, by its `prediction_type`
    (alpha_bar = alphas_cumprod[timestep]); None where that does not apply."""
    import torch

    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    prediction_type = scheduler.config.get("prediction_type")
    # Sigma-space schedulers (Euler, Heun, ...) start from noise scaled by sigma_max and keep
    # their sample unscaled, so alpha_bar does not apply to them; they report x0 themselves.
    if alphas_cumprod is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return None
    if model_output.ndim == sample.ndim and model_output.shape[1] == 2 * sample.shape[1]:
        model_output = model_output[:, : sample.shape[1]]  # a learned variance rides along
    if model_output.shape != sample.shape:
        return None
    if prediction_type == "sample":
        return model_output
    if prediction_type not in ("epsilon", "v_prediction"):
        return None
    steps = torch.as_tensor(timestep).detach().to("cpu")
    if steps.numel() == 0 or (steps.is_floating_point() and not bool((steps == steps.round()).all())):
        return None
    steps = steps.long().reshape(-1)
    alphas_cumprod = torch.as_tensor(alphas_cumprod)
    if int(steps.min()) < 0 or int(steps.max()) >= len(alphas_cumprod):
        return None
    if steps.numel() not in (1, sample.shape[0]):
        return None
    alpha_bar = alphas_cumprod[steps].to(sample.device, torch.float32)
    alpha_bar = alpha_bar.reshape(-1, *([1] * (sample.ndim - 1)))  # one per row, or one for all
    sample, model_output = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output


@functools.cache
def log_noisy_previews_once(scheduler_name: str) -> None:
    """Say, once per scheduler class, that its previews show the noisy latent."""
    log.debug("%s reports no clean-latent estimate; previews show the noisy latent", scheduler_name)


class CleanLatentTap:
    """Wraps `scheduler.step` for the duration of one pipeline call and keeps the latest x0 estimate.

    In order: the scheduler's own `pred_original_sample` (DDIM, Euler, LMS, ...); for flow matching
    x0 = sample - sigma * velocity; the multistep solvers' x0 (`model_outputs[-1]`, DPMSolver++,
    UniPC); x0 from alphas_cumprod and the prediction type (PNDM, DEIS, DPMSolver without ++);
    otherwise the current latent stands in (noisier).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.latest: Any = None

    def __enter__(self) -> CleanLatentTap:
        original = type(self.scheduler).step.__get__(self.scheduler)

        def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            before = self._stored_model_output()
            output = original(model_output, timestep, sample, *args, **kwargs)
            self.latest = self._clean_latent(output, model_output, timestep, sample, before)
            return output

        self.scheduler.step = step
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        del self.scheduler.step

    def _stored_model_output(self) -> Any:
        """The multistep solver's latest converted model output, where that is x0; else None."""
        config = self.scheduler.config
        stores_x0 = (
            config.get("algorithm_type") in CLEAN_LATENT_ALGORITHM_TYPES or config.get("predict_x0") is True
        )
        outputs = getattr(self.scheduler, "model_outputs", None)
        return outputs[-1] if stores_x0 and outputs else None

    def _clean_latent(self, output: Any, model_output: Any, timestep: Any, sample: Any, before: Any) -> Any:
        if isinstance(output, tuple):
            if len(output) > 1 and getattr(output[1], "shape", None) == sample.shape:
                return output[1]
        else:
            for name in ("pred_original_sample", "denoised"):  # `denoised`: LCM, TCD
                if getattr(output, name, None) is not None:
                    return getattr(output, name)
        sigmas = getattr(self.scheduler, "sigmas", None)
        index = getattr(self.scheduler, "step_index", None)
        if "FlowMatch" in type(self.scheduler).__name__ and sigmas is not None and index:
            sigma = sigmas[index - 1].to(sample.device, sample.dtype)
            return sample - sigma * model_output
        # The solver's own conversion follows its sigmas (Karras, flow, ...) and thresholding
        # exactly; it counts only if this step stored a new one.
        stored = self._stored_model_output()
        if stored is not None and stored is not before and getattr(stored, "shape", None) == sample.shape:
            return stored
        clean = predicted_clean_latent(self.scheduler, model_output, timestep, sample)
        if clean is not None:
            return clean
        log_noisy_previews_once(type(self.scheduler).__name__)
        return output[0] if isinstance(output, tuple) else getattr(output, "prev_sample", sample)


def denormalize_latents(vae_config: Any, latents: Any) -> Any:
    """Undo the scaling the pipeline put on its latents, as its own decode does: per-channel
    latents_mean/latents_std where the VAE has them (SDXL-style with scaling_factor; Qwen-Image and
    Wan without), else scaling_factor and shift_factor."""
    import torch

    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    scaling = vae_config.get("scaling_factor")
    if mean is not None and std is not None:
        shape = (1, -1, *([1] * (latents.ndim - 2)))
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        return latents * std / (scaling if scaling is not None else 1.0) + mean
    if scaling is None:
        raise PreviewUnavailableError(
            "the VAE's config has neither scaling_factor nor latents_mean/latents_std"
        )
    latents = latents / scaling
    shift = vae_config.get("shift_factor")
    return latents + shift if shift is not None else latents


@contextlib.contextmanager
def vae_in_dtype(vae: Any, dtype: Any) -> Iterator[None]:
    """The VAE in `dtype` for the duration, back in its own afterwards (whatever happens)."""
    original = vae.dtype
    if dtype == original:
        yield
        return
    vae.to(dtype=dtype)
    try:
        yield
    finally:
        vae.to(dtype=original)


def decode_latents(pipeline: Any, latents: Any, width: int, height: int) -> list[Any]:
    """Latents of some rows -> PIL images, as the pipeline's own decode would make them.

    A float16 VAE whose config says `force_upcast` (SDXL's overflows in float16) decodes in float32
    where the pipeline does so for the final image (SDXL's), and goes back to float16 afterwards. Raises
    PreviewUnavailableError for latents it cannot decode into one image (video, unknown packing).
    """
    import torch

    vae = pipeline.vae
    if latents.ndim == 3:  # packed (Flux-, Qwen-Image-style) latents
        if not hasattr(pipeline, "_unpack_latents"):
            raise PreviewUnavailableError(
                f"{type(pipeline).__name__} packs its latents in a way previews cannot undo"
            )
        latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    if latents.ndim == 5 and latents.shape[2] != 1:
        raise PreviewUnavailableError(
            f"previews of video latents ({latents.shape[2]} frames) are not supported"
        )
    # Only where the pipeline itself upcasts (SDXL's `upcast_vae`): SD 1.5's pipeline decodes its
    # float16 VAE as it is, though the VAE's config says force_upcast too.
    upcast = (
        vae.dtype == torch.float16
        and bool(vae.config.get("force_upcast", False))
        and callable(getattr(pipeline, "upcast_vae", None))
    )
    dtype = torch.float32 if upcast else vae.dtype
    latents = denormalize_latents(vae.config, latents.float()).to(dtype)
    with torch.inference_mode(), vae_in_dtype(vae, dtype):
        decoded = vae.decode(latents, return_dict=False)[0]
    if decoded.ndim == 5:  # (batch, channels, frames=1, height, width) from a 3-D VAE
        decoded = decoded[:, :, 0]
    return list(pipeline.image_processor.postprocess(decoded, output_type="pil"))
