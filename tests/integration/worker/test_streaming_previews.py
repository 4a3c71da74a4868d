"""Previews of real pipelines show the clean image the scheduler predicts (x0), not the noisy
latent, also with schedulers that report no `pred_original_sample`: DPMSolverMultistep
(builtin:shapes) and PNDM (Stable Diffusion 1.5's default, on the tiny model).

The pieces are the engine's own (CleanLatentTap, decode_latents, preview_steps); the measure is the
mean absolute pixel difference from the final image, against a decode of the noisy latent of the
same step. Before, with these schedulers the preview was that noisy decode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffusion_worker.model_source import resolve_model
from diffusion_worker.previews import CleanLatentTap, decode_latents, preview_steps

pytestmark = pytest.mark.integration

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """On a busy 2-core machine two threads contend and run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distances_from_final(pipeline: Any, steps: int) -> tuple[float, float]:
    """Run `steps` steps; at the middle preview step of partial_images=3, the preview's and the
    noisy latent's mean absolute pixel difference from the final image."""
    import torch

    middle = preview_steps(steps, 3)[1]
    taken: dict[str, Any] = {}
    tap = CleanLatentTap(pipeline.scheduler)

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if step + 1 == middle:
            taken["preview"] = tap.latest.clone()
            taken["noisy"] = tensors["latents"].clone()
        return tensors

    with torch.inference_mode(), tap:
        output = pipeline(
            "a red circle on a blue background",
            num_inference_steps=steps,
            guidance_scale=5.0,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(1),
            callback_on_step_end=on_step_end,
        )
    final = np.asarray(output.images[0], dtype=float)

    def distance(latents: Any) -> float:
        image = decode_latents(pipeline, latents, SIZE, SIZE)[0]
        return float(np.abs(np.asarray(image, dtype=float) - final).mean())

    return distance(taken["preview"]), distance(taken["noisy"])


def test_builtin_shapes_previews_with_dpmsolver_are_the_predicted_clean_image(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from diffusers import DiffusionPipeline

    location = resolve_model("builtin:shapes", tmp_path_factory.mktemp("cache"))
    pipeline = DiffusionPipeline.from_pretrained(location.name_or_path)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    preview, noisy = distances_from_final(pipeline, steps=15)  # the model's default steps
    assert preview < noisy / 2, (preview, noisy)


def test_tiny_sd_previews_with_pndm_are_the_predicted_clean_image(tiny_model_dir: Path) -> None:
    from diffusers import DiffusionPipeline, PNDMScheduler

    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    # As Stable Diffusion 1.5's scheduler config has it.
    pipeline.scheduler = PNDMScheduler.from_config(pipeline.scheduler.config, skip_prk_steps=True)
    preview, noisy = distances_from_final(pipeline, steps=8)
    assert preview < noisy / 2, (preview, noisy)
