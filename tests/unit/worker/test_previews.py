"""The clean-latent (x0) estimate behind previews, per scheduler and prediction type, and the
preview decode's dtype and latent normalisation. Small random tensors and a stand-in VAE decode;
the previews of real pipelines are in tests/integration/worker/test_streaming_previews.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.image_processor import VaeImageProcessor

from diffusion_worker.previews import (
    CleanLatentTap,
    PreviewUnavailableError,
    decode_latents,
    denormalize_latents,
    log_noisy_previews_once,
    predicted_clean_latent,
)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def inputs(channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int-timestep", "tensor-timestep"])
def test_x0_agrees_with_ddims_own_pred_original_sample(prediction_type: str, as_tensor: bool) -> None:
    scheduler = DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    model_output, sample = inputs()
    for timestep in scheduler.timesteps[[1, 5, 9]]:
        step_timestep: Any = timestep if as_tensor else int(timestep)
        expected = scheduler.step(model_output, step_timestep, sample).pred_original_sample
        clean = predicted_clean_latent(scheduler, model_output, step_timestep, sample)
        torch.testing.assert_close(clean, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_agrees_with_ddpms_own_pred_original_sample_with_a_learned_variance(prediction_type: str) -> None:
    scheduler = DDPMScheduler(
        **SD_BETAS, prediction_type=prediction_type, variance_type="learned_range", clip_sample=False
    )
    scheduler.set_timesteps(10)
    model_output, sample = inputs(channels=8)  # the variance rides along in the second 4 channels
    timestep = scheduler.timesteps[4]
    expected = scheduler.step(model_output, timestep, sample).pred_original_sample
    torch.testing.assert_close(
        predicted_clean_latent(scheduler, model_output, timestep, sample), expected, rtol=1e-4, atol=1e-4
    )


def test_x0_is_left_to_sigma_space_schedulers_themselves() -> None:
    """Euler keeps its sample unscaled (x0 + sigma * noise): alpha_bar would give a wrong x0."""
    scheduler = EulerDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(10)
    model_output, sample = inputs()
    assert predicted_clean_latent(scheduler, model_output, scheduler.timesteps[3], sample) is None


def run_steps(scheduler: Any, count: int) -> list[torch.Tensor]:
    """`count` steps of `scheduler` under a tap, on fixed inputs; the tap's x0 after each."""
    model_output, sample = inputs()
    scheduler.set_timesteps(10)
    taken = []
    with CleanLatentTap(scheduler) as tap:
        for timestep in scheduler.timesteps[:count]:
            sample = scheduler.step(model_output, timestep, sample).prev_sample
            taken.append(tap.latest)
    return taken


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmsolver_previews_are_x0_whether_it_keeps_x0_or_noise(prediction_type: str) -> None:
    """DPMSolver++ keeps x0 in model_outputs (used as it is); plain DPMSolver keeps noise there, so
    x0 comes from alphas_cumprod. Same inputs, same x0; neither is the noisy latent."""
    config = {**SD_BETAS, "prediction_type": prediction_type}
    from_stored = run_steps(DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++"), 3)
    plain = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    from_formula = run_steps(plain, 3)
    model_output, sample = inputs()
    for stored, computed in zip(from_stored, from_formula, strict=True):
        torch.testing.assert_close(stored, computed, rtol=1e-4, atol=1e-4)
    scheduler = DDIMScheduler(
        **config, timestep_spacing="linspace", clip_sample=False
    )  # from 999, as DPMSolver
    scheduler.set_timesteps(10)
    first = scheduler.step(model_output, scheduler.timesteps[0], sample).pred_original_sample
    torch.testing.assert_close(from_stored[0], first, rtol=1e-4, atol=1e-4)


def test_pndm_previews_are_x0_from_the_inputs_of_its_step() -> None:
    scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True)
    model_output, sample = inputs()
    scheduler.set_timesteps(10)
    with CleanLatentTap(scheduler) as tap:
        timestep = scheduler.timesteps[0]
        noisy = scheduler.step(model_output, timestep, sample).prev_sample
    torch.testing.assert_close(tap.latest, predicted_clean_latent(scheduler, model_output, timestep, sample))
    assert not torch.allclose(tap.latest, noisy)


class NoEstimateScheduler:
    """A scheduler that reports no x0 and has no alphas_cumprod."""

    config: dict[str, Any] = {"prediction_type": "epsilon"}

    def step(self, model_output: Any, timestep: Any, sample: Any, return_dict: bool = True) -> Any:
        return SimpleNamespace(prev_sample=sample - 0.1 * model_output)


def test_a_scheduler_without_an_estimate_previews_the_noisy_latent_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_noisy_previews_once.cache_clear()
    scheduler = NoEstimateScheduler()
    model_output, sample = inputs()
    with caplog.at_level(logging.DEBUG, logger="diffusion_worker.previews"):
        for _ in range(2):
            with CleanLatentTap(scheduler) as tap:
                for _ in range(2):
                    noisy = scheduler.step(model_output, 10, sample).prev_sample
                    torch.testing.assert_close(tap.latest, noisy)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "NoEstimateScheduler reports no clean-latent estimate; previews show the noisy latent"
    ]


def stand_in_pipeline(vae: Any, **parts: Any) -> tuple[Any, list[tuple[torch.dtype, torch.dtype]]]:
    """A pipeline holding `vae`, whose decode records (VAE dtype, latents dtype) and returns grey."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def decode(latents: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        seen.append((vae.dtype, latents.dtype))
        frames = (latents.shape[2],) if latents.ndim == 5 else ()
        return (torch.zeros(latents.shape[0], 3, *frames, 16, 16, dtype=latents.dtype),)

    vae.decode = decode
    return SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(), **parts), seen


@pytest.mark.parametrize(
    ("force_upcast", "pipeline_upcasts", "decoded_in"),
    [(True, True, torch.float32), (False, True, torch.float16), (True, False, torch.float16)],
    ids=["sdxl", "vae-fine-in-float16", "sd15-pipeline-decodes-in-float16"],
)
def test_a_float16_vae_decodes_previews_in_float32_where_its_pipeline_upcasts_and_goes_back(
    force_upcast: bool, pipeline_upcasts: bool, decoded_in: torch.dtype
) -> None:
    """SDXL's VAE overflows in float16 (black previews); its pipeline decodes the final image in
    float32 (`upcast_vae`) and so do previews now, leaving the VAE in float16 for the pipeline's own
    decode. SD 1.5's pipeline has no upcast, so its previews decode in float16 as its image does."""
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, force_upcast=force_upcast).to(
        torch.float16
    )
    parts = {"upcast_vae": lambda: vae.to(torch.float32)} if pipeline_upcasts else {}
    pipeline, seen = stand_in_pipeline(vae, **parts)
    images = decode_latents(pipeline, torch.randn(2, 4, 2, 2, dtype=torch.float16), 16, 16)
    assert len(images) == 2 and images[0].size == (16, 16)
    assert seen == [(decoded_in, decoded_in)]
    assert vae.dtype == torch.float16


def test_latents_mean_and_std_are_undone_as_sdxl_and_qwen_image_pipelines_do() -> None:
    latents = torch.randn(1, 4, 2, 2)
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    sdxl = {"scaling_factor": 0.5, "latents_mean": mean, "latents_std": std}
    as_sdxl = latents * torch.tensor(std).view(1, 4, 1, 1) / 0.5 + torch.tensor(mean).view(1, 4, 1, 1)
    torch.testing.assert_close(denormalize_latents(sdxl, latents), as_sdxl)
    qwen = {"latents_mean": mean, "latents_std": std}  # a 3-D VAE: (batch, channels, frames, h, w)
    video = latents.unsqueeze(2)
    as_qwen = video / (1.0 / torch.tensor(std).view(1, 4, 1, 1, 1)) + torch.tensor(mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(qwen, video), as_qwen)
    flux = {"scaling_factor": 0.5, "shift_factor": 0.1}
    torch.testing.assert_close(denormalize_latents(flux, latents), latents / 0.5 + 0.1)


def test_single_frame_latents_of_a_3d_vae_decode_to_images_and_video_latents_are_refused() -> None:
    vae = SimpleNamespace(dtype=torch.float32, config={"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    pipeline, seen = stand_in_pipeline(vae)
    images = decode_latents(pipeline, torch.randn(1, 4, 1, 2, 2), 16, 16)
    assert len(images) == 1 and images[0].size == (16, 16) and len(seen) == 1
    with pytest.raises(PreviewUnavailableError, match="3 frames"):
        decode_latents(pipeline, torch.randn(1, 4, 3, 2, 2), 16, 16)
