"""Streaming partial images and the current OpenAI request surface, with the official client."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from support.engines import ObservedEngine, observed_loader
from support.worker_server import wait_for_queued_images, worker_process

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]


def stream_events(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(client.images.generate(prompt="a red circle", stream=True, **kwargs))


def test_stream_yields_partials_then_a_completed_image_equal_to_the_non_streamed_one(
    client: openai.OpenAI,
) -> None:
    nvext = {"seed": 5, "num_inference_steps": 8}
    events = stream_events(client, partial_images=3, extra_body={"nvext": nvext})
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:3]] == [0, 1, 2]
    for event in events:
        assert base64.b64decode(event.b64_json).startswith(b"\x89PNG")
        assert (event.size, event.output_format, event.background) == ("64x64", "png", "opaque")
        assert event.model_extra["nvext"] == {"image_index": 0, "seed": 5}
    plain = client.images.generate(
        prompt="a red circle", response_format="b64_json", extra_body={"nvext": nvext}
    )
    assert events[-1].b64_json == (plain.data or [])[0].b64_json
    assert len({event.b64_json for event in events}) == 4, "previews show the image coming into view"


def test_partial_images_zero_yields_only_the_completed_event(client: openai.OpenAI) -> None:
    events = stream_events(client, partial_images=0, extra_body={"nvext": {"num_inference_steps": 3}})
    assert [event.type for event in events] == ["image_generation.completed"]
    assert events[0].usage.total_tokens == 0


def test_n_images_stream_their_own_events_told_apart_by_image_index(client: openai.OpenAI) -> None:
    events = stream_events(
        client, n=2, partial_images=1, extra_body={"nvext": {"seed": 1, "num_inference_steps": 4}}
    )
    by_image: dict[int, list[str]] = {}
    for event in events:
        by_image.setdefault(event.model_extra["nvext"]["image_index"], []).append(event.type)
    assert by_image == {
        0: ["image_generation.partial_image", "image_generation.completed"],
        1: ["image_generation.partial_image", "image_generation.completed"],
    }


def test_stream_events_are_server_sent_events_on_the_wire(worker_url: str) -> None:
    body = {"prompt": "p", "stream": True, "partial_images": 1, "nvext": {"num_inference_steps": 4}}
    with httpx.stream("POST", f"{worker_url}/v1/images/generations", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    frames = [frame for frame in text.split("\n\n") if frame]
    assert [frame.splitlines()[0] for frame in frames] == [
        "event: image_generation.partial_image",
        "event: image_generation.completed",
    ]
    assert (
        json.loads(frames[1].splitlines()[1].removeprefix("data: "))["type"] == "image_generation.completed"
    )


def test_disconnect_mid_stream_frees_the_pipeline(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    # 64x64 keeps a step at milliseconds (256x256 on the tiny model is 4096-token attention, ~2 s a
    # step on a 2-core CPU, which made the first preview arrive only after minutes); 600 steps keep
    # the call running long after the first preview, so the hang-up lands mid-call.
    url = start_worker(engine_loader=observed_loader(engines, gated=False), max_inference_steps=600)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.images.generate(
        prompt="p",
        stream=True,
        partial_images=3,
        size="64x64",
        extra_body={"nvext": {"num_inference_steps": 600}},
    )
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    stream.close()  # the client hangs up after the first preview
    follow_up = client.images.generate(
        prompt="q", response_format="b64_json", extra_body={"nvext": {"num_inference_steps": 1}}
    )
    assert len(follow_up.data or []) == 1
    assert engines[0].cancelled_calls == 1
    assert engines[0].steps_run[0] < 600


def test_a_streamed_request_can_share_a_batch(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True), max_batch_size=4)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    results: dict[str, Any] = {}

    def plain() -> None:
        results["plain"] = client.images.generate(
            prompt="b",
            response_format="b64_json",
            extra_body={"nvext": {"seed": 2, "num_inference_steps": 4}},
        )

    def streamed() -> None:
        results["streamed"] = stream_events(
            client, partial_images=2, extra_body={"nvext": {"seed": 3, "num_inference_steps": 4}}
        )

    blocker = threading.Thread(target=lambda: client.images.generate(prompt="x", response_format="b64_json"))
    blocker.start()
    assert engines[0].entered.wait(30)  # the engine is busy; the next two queue up together
    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while "diffusion_worker_queue_images 3.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    engines[0].gate.set()
    for thread in [blocker, *threads]:
        thread.join(60)
    assert sorted(engines[0].batches[1].seeds) == [2, 3], "plain and streamed requests shared one call"
    assert [e.type for e in results["streamed"]].count("image_generation.partial_image") == 2
    assert len(results["plain"].data) == 1


QUALITY_STEPS_WITH_D8 = {
    "low": 2,
    "medium": 4,
    "auto": 8,
    "standard": 8,
    "high": 8,
    "hd": 12,
    "xhigh": 12,
    "max": 16,
}


def test_each_quality_maps_to_its_documented_step_count(start_worker: WorkerFactory) -> None:
    """D = 8 (default steps): low 0.25D, medium 0.5D, auto/standard/high D, hd/xhigh 1.5D, max 2D."""
    engines: list[ObservedEngine] = []
    url = start_worker(
        engine_loader=observed_loader(engines, gated=False), default_inference_steps=8, max_inference_steps=20
    )
    for quality in QUALITY_STEPS_WITH_D8:
        response = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "p", "quality": quality, "response_format": "b64_json"},
        )
        assert response.status_code == 200
        # Reported in the response vocabulary, which has no auto, standard or hd.
        assert response.json()["quality"] == {"auto": "high", "standard": "high", "hd": "xhigh"}.get(
            quality, quality
        )
    assert [b.num_inference_steps for b in engines[0].batches] == list(QUALITY_STEPS_WITH_D8.values())


def test_quality_steps_never_exceed_the_step_cap(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(
        engine_loader=observed_loader(engines, gated=False), default_inference_steps=8, max_inference_steps=10
    )
    response = httpx.post(
        f"{url}/v1/images/generations", json={"prompt": "p", "quality": "max", "response_format": "b64_json"}
    )
    assert response.status_code == 200
    assert engines[0].batches[0].num_inference_steps == 10


def test_quality_steps_are_configurable_and_explicit_steps_win(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False), quality_steps={"low": 3})
    for body in (
        {"prompt": "p", "quality": "low"},
        {"prompt": "p", "quality": "low", "nvext": {"num_inference_steps": 4}},
    ):
        assert (
            httpx.post(
                f"{url}/v1/images/generations", json={**body, "response_format": "b64_json"}
            ).status_code
            == 200
        )
    assert [b.num_inference_steps for b in engines[0].batches] == [3, 4]


def test_safety_identifier_names_the_storage_folder_and_is_echoed(client: openai.OpenAI) -> None:
    response = client.images.generate(
        prompt="p",
        user="fallback",
        extra_body={"safety_identifier": "abuse-id-9", "nvext": {"num_inference_steps": 1}},
    )
    url = (response.data or [])[0].url
    assert url is not None and "/users/abuse-id-9/generations/" in url
    assert response.to_dict()["safety_identifier"] == "abuse-id-9"
    only_user = client.images.generate(
        prompt="p", user="u1", extra_body={"nvext": {"num_inference_steps": 1}}
    )
    assert only_user.to_dict()["safety_identifier"] == "u1"


def test_response_echoes_background_and_accepts_opaque_and_moderation(client: openai.OpenAI) -> None:
    for background in ("auto", "opaque"):
        response = client.images.generate(
            prompt="p",
            background=background,
            moderation="low",
            response_format="b64_json",
            extra_body={"nvext": {"num_inference_steps": 1}},
        )
        assert response.background == "opaque"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "svg"}, "output_format"),
        ({"svg": {"viewBox": "0 0 1 1"}}, "svg"),
        ({"frame_count": 4}, "frame_count"),
        ({"frame_duration_ms": 100}, "frame_duration_ms"),
        ({"complexity": "high"}, "complexity"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"stream": "yes"}, "stream"),
        ({"moderation": "strict"}, "moderation"),
    ],
)
def test_unsupported_values_are_400_naming_the_parameter(
    worker_url: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{worker_url}/v1/images/generations", json={"prompt": "p", **body})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_streams_gone_at_shutdown_end_cleanly(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A real worker process with --drain-timeout 3. A client that left its stream early, and a
    stream still running when the drain time runs out: the second gets an `error` event with 503
    `shutting_down` (before, uvicorn cut the connection without a word and logged a traceback),
    and neither leaves a pending task behind (before, each early exit left one, which asyncio later
    logged as "Task was destroyed but it is pending!")."""
    flags = ("--drain-timeout", "3", "--max-batch-size", "1", "--storage-url", f"file://{tmp_path}")
    body = {"prompt": "p", "size": "256x256", "stream": True, "partial_images": 3}
    body["nvext"] = {"num_inference_steps": 999}
    steps = {"DIFFUSION_WORKER_MAX_INFERENCE_STEPS": "1000"}
    with worker_process(tiny_model_dir, *flags, env=steps) as worker:
        generations = f"{worker.url}/v1/images/generations"
        with httpx.stream("POST", generations, json=body, timeout=60):
            wait_for_queued_images(worker.url, 1)
        wait_for_queued_images(worker.url, 0)  # the early leaver's work was dropped
        events: list[dict[str, Any]] = []

        def read_stream() -> None:
            with httpx.stream("POST", generations, json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))

        reader = threading.Thread(target=read_stream)
        reader.start()
        wait_for_queued_images(worker.url, 1)
        worker.process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert worker.process.wait(timeout=120) == 0
        log = worker.log()
    assert events and events[-1]["type"] == "error", events
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")
    assert "Exception in ASGI application" not in log
    assert "Task was destroyed but it is pending" not in log


def test_a_stream_waiting_for_its_image_sends_keep_alive_comments_the_client_skips(
    start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream with no preview due (queued behind others, or partial_images 0) sent nothing until
    its image was done, long enough for a proxy's idle timeout to cut it. The keep-alive period is
    shortened here from 15 s to 0.2 s; the engine is held at a gate for a second."""
    from diffusion_worker import app as worker_app

    monkeypatch.setattr(worker_app, "SSE_KEEPALIVE_SECONDS", 0.2)
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True))
    threading.Timer(1.0, engines[0].gate.set).start()
    body = {"prompt": "p", "stream": True, "nvext": {"num_inference_steps": 2}}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as response:
        text = "".join(response.iter_text())
    assert text.count(": keep-alive\n\n") >= 3, text[:200]
    assert text.rstrip().splitlines()[-2] == "event: image_generation.completed"
    engines[0].gate.clear()
    threading.Timer(1.0, engines[0].gate.set).start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [event.type for event in stream_events(client)] == ["image_generation.completed"]


@pytest.mark.parametrize("quality", ["auto", "standard", "hd", "low"])
def test_responses_and_events_validate_strictly_against_the_openai_types(
    worker_url: str, quality: str
) -> None:
    """The official client builds its models without validation, so a value outside its Literal
    types (quality "auto" in a response, "hd" in an event) passes unnoticed there; user code that
    validates (pydantic's model_validate) would reject it."""
    from openai.types import ImagesResponse
    from openai.types.image_gen_completed_event import ImageGenCompletedEvent
    from openai.types.image_gen_partial_image_event import ImageGenPartialImageEvent

    body = {
        "prompt": "p",
        "quality": quality,
        "response_format": "b64_json",
        "nvext": {"num_inference_steps": 2},
    }
    ImagesResponse.model_validate(
        httpx.post(f"{worker_url}/v1/images/generations", json=body, timeout=60).json()
    )
    streamed = {**body, "stream": True, "partial_images": 1}
    streamed.pop("response_format")
    with httpx.stream("POST", f"{worker_url}/v1/images/generations", json=streamed, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [event["type"] for event in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    ImageGenPartialImageEvent.model_validate(events[0])
    ImageGenCompletedEvent.model_validate(events[1])


def test_a_preview_that_fails_to_decode_costs_the_stream_only_its_previews(
    start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preview decode made to fail (no real input makes the tiny VAE fail; on a GPU, the extra
    decode running out of memory would): before, the whole call failed, so every request of the
    batch got a 500 and the failure counted against the engine. Now the stream has fewer previews
    (as the API allows) and its image."""
    from diffusion_worker import engine

    def failing_decode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("preview decode ran out of memory")

    monkeypatch.setattr(engine, "decode_latents", failing_decode)
    url = start_worker()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    events = stream_events(client, partial_images=2, extra_body={"nvext": {"num_inference_steps": 4}})
    assert [event.type for event in events] == ["image_generation.completed"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'diffusion_worker_failed_requests_total{reason="pipeline_error"} 0.0' in metrics
    assert "diffusion_worker_out_of_memory_splits_total 0.0" in metrics
