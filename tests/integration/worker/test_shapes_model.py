"""builtin:shapes draws what the prompt asks for, measured from pixels (issue 8).

Each test draws a few images at the model's own defaults (worker_defaults.json); about 200
images in all, about 70 s on a 2-core CPU.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from diffusion_worker.model_source import model_defaults, resolve_model
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.shapes import evaluate
from support.worker_server import running_worker

pytestmark = pytest.mark.integration

SEEDS = [1000, 1001]
# The targets; training.json has the same measures over 8 seeds.
MIN_ADHERENCE = 0.9
MIN_GUIDANCE_GAIN = 0.15
GUIDANCE_SEEDS = list(range(1000, 1008))
# "Measurably less red": less red on every one of 8 seeds (by chance alone: 1 in 256), and by more on
# average than the seeds differ from each other without the negative prompt.
NEGATIVE_SEEDS = list(range(1000, 1008))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """builtin:shapes loaded through DiffusionPipeline.from_pretrained, on one CPU thread."""
    import torch
    from diffusers import DiffusionPipeline

    location = resolve_model("builtin:shapes", tmp_path_factory.mktemp("cache"))
    loaded = DiffusionPipeline.from_pretrained(location.name_or_path)
    loaded.set_progress_bar_config(disable=True)
    loaded.worker_defaults = model_defaults(location)
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine two threads contend and run many times slower.
    torch.set_num_threads(1)
    yield loaded
    torch.set_num_threads(threads)


def drawer(pipeline: Any, **overrides: Any) -> evaluate.Draw:
    defaults = pipeline.worker_defaults
    kwargs = {
        "num_inference_steps": defaults["num_inference_steps"],
        "guidance_scale": defaults["guidance_scale"],
        **overrides,
    }
    return evaluate.pipeline_drawer(pipeline, **kwargs)


@pytest.fixture(scope="module")
def cases() -> list[evaluate.AdherenceCase]:
    return evaluate.evaluation_cases(held_out=False) + evaluate.evaluation_cases(held_out=True)


@pytest.fixture(scope="module")
def default_images(pipeline: Any, cases: list[evaluate.AdherenceCase]) -> list[list[np.ndarray]]:
    """Images at the model's defaults: one list per case, one image per seed."""
    draw = drawer(pipeline)
    return [list(draw([case.prompt] * len(SEEDS), SEEDS)) for case in cases]


def test_background_color_follows_the_prompt(
    cases: list[evaluate.AdherenceCase], default_images: list[list[np.ndarray]]
) -> None:
    wanted = [case.prompt.rsplit(" ", 2)[-2] for case in cases]
    found = [[evaluate.measure(image).background for image in images] for images in default_images]
    hits = sum(got == want for want, row in zip(wanted, found, strict=True) for got in row)
    assert hits / (len(cases) * len(SEEDS)) >= 0.9, found


def test_every_image_shows_one_foreground_object(default_images: list[list[np.ndarray]]) -> None:
    for images in default_images:
        for image in images:
            assert evaluate.measure(image).color is not None


def adherence_of(
    cases: list[evaluate.AdherenceCase], images: list[list[np.ndarray]], held_out: bool
) -> float:
    """Fraction of the images drawn for the seen (or held-out) cases that show the asked foreground."""
    wanted = evaluate.evaluation_cases(held_out=held_out)
    rows = [row for case, row in zip(cases, images, strict=True) if case in wanted]
    assert len(rows) == len(wanted)
    hits = [
        evaluate.adheres(image, case.color, case.shape)
        for case, row in zip(wanted, rows, strict=True)
        for image in row
    ]
    return sum(hits) / len(hits)


def test_seen_pairs_adhere(
    cases: list[evaluate.AdherenceCase], default_images: list[list[np.ndarray]]
) -> None:
    assert adherence_of(cases, default_images, held_out=False) >= MIN_ADHERENCE


def test_held_out_pairs_adhere(
    cases: list[evaluate.AdherenceCase], default_images: list[list[np.ndarray]]
) -> None:
    assert adherence_of(cases, default_images, held_out=True) >= MIN_ADHERENCE


def test_guidance_1_adheres_clearly_less_than_the_default(
    pipeline: Any, cases: list[evaluate.AdherenceCase]
) -> None:
    """Eight seeds, as in training.json: at four, one or two images decide the gap (0.9 vs 0.8 there;
    0.94 vs 0.75 over eight)."""
    guided = evaluate.adherence(drawer(pipeline), cases, GUIDANCE_SEEDS)
    unguided = evaluate.adherence(drawer(pipeline, guidance_scale=1.0), cases, GUIDANCE_SEEDS)
    assert unguided <= guided - MIN_GUIDANCE_GAIN, (guided, unguided)


def test_negative_prompt_red_makes_a_red_circle_less_red(pipeline: Any) -> None:
    prompt, negative = evaluate.NEGATIVE_PROMPT_CASE
    count = len(NEGATIVE_SEEDS)
    plain = [evaluate.redness(image) for image in drawer(pipeline)([prompt] * count, NEGATIVE_SEEDS)]
    draw_avoiding = drawer(pipeline, negative_prompt=negative)
    avoided = [evaluate.redness(image) for image in draw_avoiding([prompt] * count, NEGATIVE_SEEDS)]
    assert min(plain) > 0.1
    assert all(less < more for less, more in zip(avoided, plain, strict=True)), (plain, avoided)
    assert np.mean(plain) - np.mean(avoided) > max(plain) - min(plain), (plain, avoided)


def test_same_seed_gives_the_same_image_and_another_seed_does_not(pipeline: Any) -> None:
    draw = drawer(pipeline)
    first, again, other = draw(["a white cross on a blue background"] * 3, [5, 5, 6])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_worker_serves_builtin_shapes_by_default_with_its_own_step_count(tmp_path: Path) -> None:
    settings = WorkerSettings(cache_dir=tmp_path / "cache", storage_url=f"file://{tmp_path / 'images'}")
    assert settings.model == "builtin:shapes"
    with running_worker(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.images.generate(
            prompt="a yellow square on a purple background",
            response_format="b64_json",
            extra_body={"nvext": {"seed": 3}},
        )
    (image,) = response.data or []
    assert image.b64_json is not None
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json))).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    found = evaluate.measure(pixels)
    assert (found.background, found.color) == ("purple", "yellow")
