"""Out of device memory: a batch is split until it fits, and only an image that never fits fails;
that size is then batched smaller for a while; at start-up, --check-max-batch caps batches at what
fits.

No CPU can run out of CUDA memory for real, so the real tiny pipeline is wrapped by
`OutOfMemoryWhen` (tests/support/engines.py), which raises `torch.cuda.OutOfMemoryError` for the
calls a test picks, at once or part-way through the denoising loop; every other call is the real
pipeline's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from diffusion_worker.engine import (
    DiffusersEngine,
    Engine,
    GenerationBatch,
    ModelLoadError,
    load_engines,
    prepare_engines,
)
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.scheduler import Scheduler
from diffusion_worker.settings import WorkerSettings
from support.engines import ObservedEngine, OutOfMemoryWhen, observed_loader
from support.worker_server import post_queued

pytestmark = pytest.mark.integration

LAPSE = 3.0  # seconds a learned batch limit lasts in the lapse test (the worker's: 600)

WorkerFactory = Callable[..., str]


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def metric(url: str, line: str) -> bool:
    return line in httpx.get(f"{url}/metrics").text


def real_engine(engines: list[ObservedEngine]) -> DiffusersEngine:
    inner = engines[0].inner
    assert isinstance(inner, DiffusersEngine)
    return inner


def test_a_single_image_that_does_not_fit_gives_503_frees_the_memory_and_the_worker_keeps_serving(
    start_worker: WorkerFactory,
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False))
    failing = OutOfMemoryWhen.once(real_engine(engines))
    response = post(url, {"prompt": "p", "size": "64x64", "response_format": "b64_json"})
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "out_of_memory")
    assert "cpu ran out of memory making 1 64x64 image)" in error["message"]
    assert error["message"].endswith("Retry, or ask for a smaller size")
    assert "Traceback" not in response.text and "GiB" not in response.text
    assert not failing.leaked(), "the failed call's tensors are still referenced after the 503"
    assert metric(url, 'diffusion_worker_failed_requests_total{reason="out_of_memory"} 1.0')
    assert metric(url, "diffusion_worker_out_of_memory_splits_total 0.0"), "one image cannot be split"
    assert post(url, {"prompt": "p", "response_format": "b64_json"}).status_code == 200


def test_a_batch_that_does_not_fit_is_split_until_it_does_and_its_images_are_unchanged(
    start_worker: WorkerFactory,
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_batch_size=4)
    body = {"prompt": "p", "n": 4, "response_format": "b64_json", "nvext": {"seed": 7}}
    whole = post(url, body)
    assert [len(batch) for batch in engines[0].batches] == [4], "the real pipeline, one call"
    failing = OutOfMemoryWhen(real_engine(engines), lambda call: len(call["prompt"]) > 1)
    response = post(url, body)
    assert response.status_code == 200, response.text
    assert [len(batch) for batch in engines[0].batches[1:]] == [4, 2, 1, 1, 2, 1, 1]
    assert failing.failures == 3 and not failing.leaked()
    assert metric(url, "diffusion_worker_out_of_memory_splits_total 3.0")
    assert metric(url, 'diffusion_worker_failed_requests_total{reason="out_of_memory"} 0.0')
    split_images = [pixels(image["b64_json"]) for image in response.json()["data"]]
    whole_images = [pixels(image["b64_json"]) for image in whole.json()["data"]]
    for split_image, whole_image in zip(split_images, whole_images, strict=True):
        assert np.abs(split_image - whole_image).max() <= 1
    assert len({image.tobytes() for image in split_images}) == 4, "four seeds, four images"


def test_a_size_and_guidance_that_ran_out_are_then_batched_smaller_others_are_not(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_batch_size=4)
    failing = OutOfMemoryWhen(
        real_engine(engines), lambda call: len(call["prompt"]) > 2 and call["guidance_scale"] > 1
    )
    body = {"prompt": "p", "n": 4, "size": "64x64", "response_format": "b64_json"}
    assert post(url, body).status_code == 200
    assert [len(batch) for batch in engines[0].batches] == [4, 2, 2]
    assert "making 64x64 images at most 2 at a time for the next 600 s" in caplog.text
    assert post(url, body).status_code == 200
    assert [len(batch) for batch in engines[0].batches[3:]] == [2, 2], "no failed call the second time"
    other_guidance = {**body, "nvext": {"guidance_scale": 1.0}}
    assert post(url, other_guidance).status_code == 200
    assert [len(batch) for batch in engines[0].batches[5:]] == [4], "another guidance is not limited"
    assert failing.failures == 1


def test_a_learned_limit_lapses_and_the_full_batch_is_tried_again(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the scheduler itself, with a 3 s lapse instead of the worker's 600 s. r1's halves and r2
    (four tiny calls, about 0.1 s each) must run before the lapse: with 0.5 s a loaded machine
    once let it lapse during r2; 3 s leaves a wide margin and costs 3 s."""
    caplog.set_level(logging.INFO, logger="diffusion_worker.scheduler")
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    assert isinstance(engine, DiffusersEngine)
    failing = OutOfMemoryWhen(engine, lambda call: len(call["prompt"]) > 2)
    observed = ObservedEngine(engine, gated=False)
    scheduler = Scheduler(
        [observed], max_queue=16, max_batch_size=4, metrics=WorkerMetrics(), learned_limit_seconds=LAPSE
    )
    batch = GenerationBatch(
        prompts=["p"] * 4,
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=7.5,
        seeds=[1, 2, 3, 4],
    )

    async def scenario() -> None:
        scheduler.start()
        await scheduler.generate(batch, "r1")
        await scheduler.generate(batch, "r2")
        await asyncio.sleep(LAPSE + 0.1)  # the limit was learned before r1 returned
        failing.restore()
        await scheduler.generate(batch, "r3")

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
    assert [len(call) for call in observed.batches] == [4, 2, 2, 2, 2, 4]
    assert "trying batches of 4 64x64 images again" in caplog.text


def test_a_batch_whose_decode_runs_out_is_decoded_image_by_image_without_redoing_its_steps(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The VAE's own batched decode (`vae._decode`, under diffusers' slicing) runs out of memory
    for more than one image: the stand-in raises torch.OutOfMemoryError there."""
    import torch

    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_batch_size=4)
    body = {"prompt": "p", "n": 4, "response_format": "b64_json", "nvext": {"seed": 7}}
    whole = post(url, body)
    vae = real_engine(engines).pipeline.vae
    real_decode = vae._decode
    decoded: list[int] = []

    def decode_running_out_above_one_image(latents: Any, *args: Any, **kwargs: Any) -> Any:
        decoded.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_decode(latents, *args, **kwargs)

    vae._decode = decode_running_out_above_one_image
    response = post(url, body)
    assert response.status_code == 200, response.text
    assert decoded == [4, 1, 1, 1, 1]
    assert [len(batch) for batch in engines[0].batches] == [4, 4], "one pipeline call, not split"
    assert engines[0].steps_run[1] == engines[0].steps_run[0], "the denoising steps ran once"
    assert metric(url, "diffusion_worker_out_of_memory_splits_total 0.0")
    assert "decoding one image at a time from now on" in caplog.text
    for image, reference in zip(response.json()["data"], whole.json()["data"], strict=True):
        assert np.abs(pixels(image["b64_json"]) - pixels(reference["b64_json"])).max() <= 1
    assert post(url, body).status_code == 200
    assert decoded[5:] == [1, 1, 1, 1], "slicing stays on: no failed decode the next time"


def test_only_the_request_whose_image_does_not_fit_fails_the_one_sharing_its_batch_succeeds(
    start_worker: WorkerFactory,
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True), max_batch_size=4)
    OutOfMemoryWhen(real_engine(engines), lambda call: "huge" in call["prompt"])
    results: dict[str, httpx.Response] = {}
    b64 = {"response_format": "b64_json"}
    blocker = post_queued(url, {**b64, "prompt": "x"}, results, "blocker", queued_after=1)
    assert engines[0].entered.wait(30)  # the engine is busy; the next two requests queue up together
    threads = [
        post_queued(url, {**b64, "prompt": "huge"}, results, "huge", queued_after=2),
        post_queued(url, {**b64, "prompt": "fine", "n": 2}, results, "fine", queued_after=4),
    ]
    engines[0].gate.set()
    for thread in [blocker, *threads]:
        thread.join(60)
    assert [batch.prompts for batch in engines[0].batches] == [
        ["x"],
        ["huge", "fine", "fine"],
        ["huge"],
        ["fine", "fine"],
    ]
    assert results["huge"].status_code == 503
    assert results["huge"].json()["error"]["code"] == "out_of_memory"
    assert results["fine"].status_code == 200 and len(results["fine"].json()["data"]) == 2
    assert results["blocker"].status_code == 200


def test_a_stream_retried_after_running_out_of_memory_mid_call_sends_each_preview_once(
    start_worker: WorkerFactory,
) -> None:
    """8 steps with 2 previews stream them after steps 3 and 5; the batch of two images runs out
    of memory after step 4, so step 3's previews were already sent when each image is redone alone."""
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_batch_size=2)
    failing = OutOfMemoryWhen(real_engine(engines), lambda call: len(call["prompt"]) > 1, at_step=4)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    events = list(
        client.images.generate(
            prompt="a red circle",
            n=2,
            stream=True,
            partial_images=2,
            extra_body={"nvext": {"seed": 1, "num_inference_steps": 8}},
        )
    )
    assert failing.failures == 1
    assert [len(batch) for batch in engines[0].batches] == [2, 1, 1]
    assert engines[0].steps_run == [4, 8, 8]
    by_image: dict[int, list[tuple[str, int | None]]] = {}
    for event in events:
        index = getattr(event, "partial_image_index", None)
        by_image.setdefault(event.model_extra["nvext"]["image_index"], []).append((event.type, index))
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert by_image == {image: [(partial, 0), (partial, 1), (completed, None)] for image in (0, 1)}


def loader_running_out_above(
    images: int, holder: list[ObservedEngine]
) -> Callable[[WorkerSettings], list[Engine]]:
    """load_engines' own steps (load, then prepare_engines: the start-up batch check) with the
    pipeline running out of memory for calls of more than `images` images."""

    def load(settings: WorkerSettings) -> list[Engine]:
        engine = DiffusersEngine.load(settings, "cpu")
        OutOfMemoryWhen(engine, lambda call: len(call["prompt"]) > images)
        prepare_engines([engine], settings)
        holder.append(ObservedEngine(engine, gated=False))
        return list(holder)

    return load


def test_start_up_caps_batches_at_what_fits_so_requests_never_split(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(
        engine_loader=loader_running_out_above(2, engines), max_batch_size=8, check_max_batch="on"
    )
    assert "--max-batch-size 8 does not fit in cpu's memory at 64x64; batches capped at 2" in caplog.text
    assert engines[0].info.max_batch_size == 2
    response = post(url, {"prompt": "p", "n": 4, "response_format": "b64_json"})
    assert response.status_code == 200 and len(response.json()["data"]) == 4
    assert [len(batch) for batch in engines[0].batches] == [2, 2]
    assert metric(url, "diffusion_worker_out_of_memory_splits_total 0.0")


def test_start_up_refuses_a_model_one_image_of_which_does_not_fit(tiny_model_dir: Path) -> None:
    settings = WorkerSettings(model=str(tiny_model_dir), check_max_batch="on", max_batch_size=4)
    engine = DiffusersEngine.load(settings, "cpu")
    failing = OutOfMemoryWhen(engine, lambda call: True)
    with pytest.raises(
        ModelLoadError, match=r"one 64x64 image does not fit in cpu's memory .* try --vae-tiling"
    ):
        prepare_engines([engine], settings)
    assert failing.failures == 3, "tried 4, 2, then 1 image"


def test_the_start_up_check_is_off_on_a_cpu_by_default(tiny_model_dir: Path) -> None:
    settings = WorkerSettings(model=str(tiny_model_dir), max_batch_size=4)
    assert settings.check_max_batch == "auto"
    engine = DiffusersEngine.load(settings, "cpu")
    failing = OutOfMemoryWhen(engine, lambda call: True)
    prepare_engines([engine], settings)
    assert failing.failures == 0 and engine.info.max_batch_size is None
