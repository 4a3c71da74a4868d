"""A model that ships a safety checker (Stable Diffusion 1.x/2.x checkpoints do): a flagged image is
a 400 `moderation_blocked`, as OpenAI answers, never a black PNG with 200; `--safety-checker false`
does not load it. Real parts: a real diffusers `StableDiffusionSafetyChecker` (tiny, random weights,
its thresholds chosen to flag every image or none) saved with the pipeline and loaded through
`from_pretrained`, the worker under uvicorn, the official openai client."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from support.safety_checker import with_safety_checker
from support.worker_server import metric_value

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
FAILED_BLOCKED = 'diffusion_worker_failed_requests_total{reason="moderation_blocked"}'


@pytest.fixture(scope="module")
def flags_everything(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_safety_checker(
        tiny_model_dir, tmp_path_factory.mktemp("checked") / "m", flags_every_image=True
    )


@pytest.fixture(scope="module")
def flags_nothing(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_safety_checker(
        tiny_model_dir, tmp_path_factory.mktemp("checked") / "m", flags_every_image=False
    )


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def pixels(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))))


def stream_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as response:
        text = "".join(response.iter_text())
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


def test_a_flagged_image_is_a_400_moderation_blocked_not_a_black_picture(
    start_worker: WorkerFactory, flags_everything: Path
) -> None:
    url = start_worker(model=str(flags_everything))
    with pytest.raises(openai.BadRequestError) as refused:
        client(url).images.generate(prompt="p", n=2, response_format="b64_json")
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("image_generation_user_error", "moderation_blocked")
    assert "flagged 2 of the 2 images" in error["message"]
    assert metric_value(url, FAILED_BLOCKED) == 1


def test_a_streamed_request_gets_no_unchecked_preview_and_an_error_event(
    start_worker: WorkerFactory, flags_everything: Path
) -> None:
    """Previews are decoded before the checker runs, so a model with one streams none (the API
    allows fewer partial images than asked for)."""
    url = start_worker(model=str(flags_everything))
    events = stream_events(url, {"prompt": "p", "stream": True, "partial_images": 2})
    assert [event["type"] for event in events] == ["error"]
    assert events[0]["error"]["code"] == "moderation_blocked"


def test_images_the_checker_passes_are_served_and_streamed_without_previews(
    start_worker: WorkerFactory, flags_nothing: Path
) -> None:
    url = start_worker(model=str(flags_nothing))
    result = client(url).images.generate(prompt="p", n=2, response_format="b64_json")
    assert all(pixels(image.b64_json).max() > 0 for image in result.data or []), "not blacked out"
    events = stream_events(url, {"prompt": "p", "stream": True, "partial_images": 2})
    assert [event["type"] for event in events] == ["image_generation.completed"]


def test_safety_checker_false_does_not_load_it(start_worker: WorkerFactory, flags_everything: Path) -> None:
    url = start_worker(model=str(flags_everything), safety_checker=False)
    result = client(url).images.generate(prompt="p", response_format="b64_json")
    assert pixels((result.data or [])[0].b64_json).max() > 0
    assert not metric_value(url, FAILED_BLOCKED), "nothing was blocked"
