"""The worker under uvicorn on loopback, driven by the official openai client (nothing mocked)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from urllib.parse import urlparse

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from support.worker_server import metric_value

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WorkerFactory = Callable[..., str]


def decode(b64: str | None) -> bytes:
    assert b64 is not None
    return base64.b64decode(b64)


def max_pixel_difference(a: bytes, b: bytes) -> int:
    first = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
    second = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
    return int(np.abs(first - second).max())


def generate_b64(client: openai.OpenAI, seed: int, **kwargs: object) -> list[bytes]:
    response = client.images.generate(
        prompt="a red circle on a blue background",
        response_format="b64_json",
        extra_body={"nvext": {"seed": seed, "num_inference_steps": 2}},
        **kwargs,  # type: ignore[arg-type]
    )
    return [decode(image.b64_json) for image in response.data or []]


def test_b64_with_n2_gives_two_distinct_pngs_of_requested_size(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="tiny-sd",
        prompt="a red circle",
        n=2,
        size="64x48",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"nvext": {"seed": 7, "num_inference_steps": 2}},
    )
    images = [decode(image.b64_json) for image in response.data or []]
    assert len(images) == 2
    assert images[0] != images[1]
    for blob in images:
        assert blob.startswith(PNG_MAGIC)
        assert Image.open(io.BytesIO(blob)).size == (64, 48)
    assert response.size == "64x48"
    assert response.output_format == "png"
    assert response.model_extra is not None and response.model_extra["nvext"]["seeds"] == [7, 8]


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_output(client: openai.OpenAI, output_format: str, pil_format: str) -> None:
    (blob,) = generate_b64(client, 1, output_format=output_format, output_compression=80)
    image = Image.open(io.BytesIO(blob))
    assert image.format == pil_format
    assert image.size == (64, 64)


def test_same_seed_gives_byte_identical_images_and_other_seeds_differ(client: openai.OpenAI) -> None:
    first = generate_b64(client, 1234, n=2)
    again = generate_b64(client, 1234, n=2)
    shifted = generate_b64(client, 1235)
    assert first == again
    # Image i of a request uses seed + i; batched matmuls differ from single ones in the last bits.
    assert max_pixel_difference(shifted[0], first[1]) <= 2
    assert generate_b64(client, 99)[0] != first[0]


def test_seed_zero_is_a_real_seed(client: openai.OpenAI) -> None:
    assert generate_b64(client, 0) == generate_b64(client, 0)


def test_absent_seed_is_random_and_reported(client: openai.OpenAI) -> None:
    seeds = []
    for _ in range(2):
        response = client.images.generate(prompt="x", response_format="b64_json")
        assert response.model_extra is not None
        seeds.append(response.model_extra["nvext"]["seeds"][0])
    assert seeds[0] != seeds[1]
    assert generate_b64(client, seeds[0])[0]  # a reported seed can be passed back


def test_url_with_file_storage_is_fetched_back_byte_identical(client: openai.OpenAI, worker_url: str) -> None:
    response = client.images.generate(
        prompt="a red circle on a blue background",
        user="alice",
        extra_body={"nvext": {"seed": 42, "num_inference_steps": 2}},
    )
    url = (response.data or [])[0].url
    assert url is not None and url.startswith(f"{worker_url}/v1/images/files/users/alice/generations/")
    fetched = httpx.get(url)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content == generate_b64(client, 42)[0]


@pytest.mark.parametrize(
    "user", ["../../etc", "..", "a/../../b", "/abs/path", "x\\..\\y", "....", "\x00evil"]
)
def test_path_escaping_user_stays_under_the_storage_prefix(
    client: openai.OpenAI, worker_url: str, user: str
) -> None:
    response = client.images.generate(prompt="p", user=user, extra_body={"nvext": {"num_inference_steps": 1}})
    url = (response.data or [])[0].url
    assert url is not None
    path = urlparse(url).path.removeprefix("/v1/images/files/")
    segments = path.split("/")
    assert segments[0] == "users" and segments[2] == "generations" and len(segments) == 5
    assert segments[1] not in ("", ".", "..") and "/" not in segments[1]
    assert httpx.get(url).status_code == 200


@pytest.mark.parametrize(
    "path", ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "users/../../outside.png", "users"]
)
def test_files_route_serves_nothing_outside_the_storage_root(worker_url: str, path: str) -> None:
    response = httpx.get(f"{worker_url}/v1/images/files/{path}")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_step_cap_is_a_400_naming_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="p", extra_body={"nvext": {"num_inference_steps": 21}})
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "nvext.num_inference_steps"
    assert "at most 20" in error["message"] and "21" in error["message"]


def test_steps_the_models_scheduler_cannot_run_are_a_400_not_a_crash(start_worker: WorkerFactory) -> None:
    """The tiny model's DDIM scheduler (steps_offset=1) fails inside diffusers at 1000 steps (an
    IndexError, which was a 500); the worker caps requests at 999 though --max-inference-steps
    allows 1000. That 999 runs through is checked on the scheduler alone in test_step_limit.py:
    999 steps of a pipeline take minutes on this CPU."""
    url = start_worker(max_inference_steps=1000)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="p", extra_body={"nvext": {"num_inference_steps": 1000}})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "nvext.num_inference_steps"
    assert "at most 999" in error["message"] and "scheduler" in error["message"]


@pytest.mark.parametrize(
    ("size", "needle"),
    [
        ("100x7", "multiples of 8"),
        ("big", "WIDTHxHEIGHT"),
        ("0x64", "multiples of 8"),
        ("4096x4096", "at most"),
    ],
)
def test_bad_sizes_are_400_naming_size(client: openai.OpenAI, size: str, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="p", size=size)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "size" and needle in error["message"]


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="p")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "p", "response_format": "gif"}, "response_format"),
        ({"prompt": "p", "n": 5}, "n"),
        ({"prompt": "p", "n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "p", "output_format": "bmp"}, "output_format"),
        ({"prompt": "p", "output_compression": 101}, "output_compression"),
        ({"prompt": "p", "quality": "ultra"}, "quality"),
        ({"prompt": "p", "nvext": {"seed": -1}}, "nvext.seed"),
        ({"prompt": "p", "nvext": {"guidance_scale": -2}}, "nvext.guidance_scale"),
        ({"prompt": "p", "nvext": {"steps": 3}}, "nvext.steps"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "p", "nvext": [1]}, "nvext"),
        ({"prompt": "p", "nvext": "seed=1"}, "nvext"),
    ],
)
def test_invalid_requests_are_400_openai_errors_naming_param(worker_url: str, body: dict, param: str) -> None:
    response = httpx.post(f"{worker_url}/v1/images/generations", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


# JSON admits a lone UTF-16 surrogate; no UTF-8 text holds one. Sent as raw bytes: a JSON encoder
# that writes UTF-8 cannot even produce these bodies.
NOT_UNICODE = {
    "prompt": b'{"prompt": "a red \\ud800 circle"}',
    "nvext.negative_prompt": b'{"prompt": "p", "nvext": {"negative_prompt": "\\udfff"}}',
    "nvext.annotations": b'{"prompt": "p", "nvext": {"annotations": ["ok", "\\ud800"]}}',
    "user": b'{"prompt": "p", "user": "\\ud800", "response_format": "b64_json"}',
    "safety_identifier": b'{"prompt": "p", "safety_identifier": "\\ud800"}',
}


def test_text_with_lone_surrogates_is_a_400_and_costs_the_engine_nothing(worker_url: str) -> None:
    """Before, a prompt of this kind failed in the tokenizer: a 500 counted against the engine, and
    the third took the replica out of rotation (503 device_failed until restarted); a `user` of
    this kind failed the response's encoding after the images were made (and stored)."""
    for param, body in NOT_UNICODE.items():
        for _ in range(3):
            response = httpx.post(
                f"{worker_url}/v1/images/generations",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 400, (param, response.text)
            error = response.json()["error"]
            assert error["param"] == param and "surrogate" in error["message"], error
    assert httpx.get(f"{worker_url}/health").status_code == 200
    good = httpx.post(
        f"{worker_url}/v1/images/generations", json={"prompt": "p", "response_format": "b64_json"}
    )
    assert good.status_code == 200


def test_malformed_json_unknown_route_and_wrong_method_are_openai_errors(worker_url: str) -> None:
    cases = [
        (httpx.post(f"{worker_url}/v1/images/generations", content=b"{not json"), 400),
        (httpx.post(f"{worker_url}/v1/images/generations", json=["a", "list"]), 400),
        (httpx.get(f"{worker_url}/v1/nope"), 404),
        (httpx.get(f"{worker_url}/v1/images/generations"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert cases[-1][0].headers["allow"] == "POST", "a 405 says which methods the route takes"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_sent_as_another_content_type_is_told_to_send_application_json(
    worker_url: str, content_type: str | None
) -> None:
    """Before, a valid JSON object sent as text/plain, as curl -d sends it (form-urlencoded) or with
    no Content-Type (FastAPI parses only JSON types) got "The request body must be a JSON object",
    which it was."""
    response = httpx.post(
        f"{worker_url}/v1/images/generations",
        content=b'{"prompt": "p", "response_format": "b64_json"}',
        headers={"Content-Type": content_type} if content_type else {},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_json", None)
    assert "Content-Type: application/json" in error["message"]
    assert (repr(content_type) if content_type else "no Content-Type") in error["message"]


def test_json_nested_too_deeply_to_parse_is_invalid_json(worker_url: str) -> None:
    """Before, the parser's RecursionError surfaced as code `http_error`, which the README's error
    table does not list."""
    depth = 100_000
    body = b'{"prompt": "p", "nvext": {"annotations": ' + b"[" * depth + b"]" * depth + b"}}"
    response = httpx.post(
        f"{worker_url}/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert httpx.get(f"{worker_url}/health").status_code == 200


def test_oversized_body_gets_413(worker_url: str) -> None:
    response = httpx.post(
        f"{worker_url}/v1/images/generations",
        content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # Refused before routing, still counted under its route, not with unknown paths.
    exposed = httpx.get(f"{worker_url}/metrics").text
    assert 'diffusion_worker_requests_total{route="/v1/images/generations",status="413"}' in exposed


def test_two_users_whose_ids_sanitise_alike_get_folders_of_their_own(client: openai.OpenAI) -> None:
    """`alice@example.com` and `alice_example.com` once shared one folder, and so its deletion,
    lifecycle rules and ACLs; a safe id still names its folder exactly."""
    folders = {}
    for user in ("alice@example.com", "alice_example.com", "alice"):
        response = client.images.generate(
            prompt="p", user=user, extra_body={"nvext": {"num_inference_steps": 1}}
        )
        url = (response.data or [])[0].url
        assert url is not None and httpx.get(url).status_code == 200
        folders[user] = urlparse(url).path.removeprefix("/v1/images/files/").split("/")[1]
    assert len(set(folders.values())) == 3
    assert folders["alice"] == "alice"
    assert folders["alice@example.com"].startswith("alice_example.com-")


@pytest.mark.parametrize(
    ("output_format", "size", "limit"), [("webp", "16384x8", "16383"), ("jpeg", "65504x8", "65500")]
)
def test_a_size_the_output_format_cannot_encode_is_a_400_before_any_image_is_made(
    client: openai.OpenAI, worker_url: str, output_format: str, size: str, limit: str
) -> None:
    """It used to be made, then refused by Pillow: a 500 the client retried, three generations."""
    made = metric_value(worker_url, "diffusion_worker_images_generated_total")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(
            prompt="p",
            size=size,  # type: ignore[arg-type]
            output_format=output_format,  # type: ignore[arg-type]
            response_format="b64_json",
            extra_body={"nvext": {"num_inference_steps": 1}},
        )
    error = caught.value
    assert (error.param, error.code) == ("size", "size_too_large")
    assert output_format in error.message and limit in error.message
    assert metric_value(worker_url, "diffusion_worker_images_generated_total") == made


@pytest.mark.parametrize("name", ["seed", "negative_prompt", "num_inference_steps", "guidance_scale"])
def test_an_nvext_field_at_the_top_level_is_a_400_pointing_at_nvext(
    client: openai.OpenAI, worker_url: str, name: str
) -> None:
    """Clients written for other servers send `seed` at the top level; ignored, it looked set."""
    value = "blurry" if name == "negative_prompt" else 4
    made = metric_value(worker_url, "diffusion_worker_images_generated_total")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="p", response_format="b64_json", extra_body={name: value})
    error = caught.value
    assert (error.param, error.code) == (name, "unknown_parameter")
    assert f"did you mean `nvext.{name}`?" in error.message
    assert metric_value(worker_url, "diffusion_worker_images_generated_total") == made


def test_the_json_of_b64_images_is_rendered_off_the_event_loop(
    worker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """json.dumps holds the GIL for a whole call: a response of ten 2048x2048 images, rendered at
    once on the event loop, stalled every request (/health included) for 0.44 s. Every
    json.dumps made on the event loop thread is recorded; none may carry an image."""
    dumps = json.dumps
    on_the_loop: list[str] = []

    def recording_dumps(obj: object, *args: object, **kwargs: object) -> str:
        text = dumps(obj, *args, **kwargs)  # type: ignore[arg-type]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return text
        on_the_loop.append(text)
        return text

    monkeypatch.setattr(json, "dumps", recording_dumps)
    body = {"prompt": "p", "n": 2, "size": "64x64", "response_format": "b64_json"}
    response = httpx.post(
        f"{worker_url}/v1/images/generations", json={**body, "nvext": {"num_inference_steps": 1}}, timeout=60
    )
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    parsed = response.json()
    # The bytes JSONResponse gave: compact, UTF-8, keys in the documented order.
    assert response.content == dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
    assert list(parsed) == [
        "created", "data", "size", "quality", "output_format", "background", "safety_identifier", "nvext"
    ]  # fmt: skip
    images = [item["b64_json"] for item in parsed["data"]]
    assert len(images) == 2
    assert not [text for text in on_the_loop if any(image in text for image in images)]


def test_unknown_top_level_fields_are_ignored(client: openai.OpenAI) -> None:
    response = client.images.generate(
        prompt="p",
        response_format="b64_json",
        extra_body={"some_future_field": 1, "nvext": {"num_inference_steps": 1}},
    )
    assert len(response.data or []) == 1


def test_models_health_ready_and_metrics(client: openai.OpenAI, worker_url: str) -> None:
    assert [model.id for model in client.models.list()] == ["tiny-sd"]
    assert httpx.get(f"{worker_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{worker_url}/ready").status_code == 200
    generate_b64(client, 5)
    metrics = httpx.get(f"{worker_url}/metrics").text
    assert 'diffusion_worker_requests_total{route="/v1/images/generations",status="200"}' in metrics
    assert "diffusion_worker_images_generated_total" in metrics
    assert "diffusion_worker_generation_seconds_bucket" in metrics
    # CUDA allocator figures only for CUDA devices: on a CPU they are absent, and the scrape works.
    assert "diffusion_worker_device_memory_bytes" not in metrics


def test_encoding_time_is_counted_per_response_and_format(start_worker: WorkerFactory) -> None:
    url = start_worker()
    body = {"prompt": "p", "size": "64x64", "nvext": {"num_inference_steps": 2}}
    for extra in ({"n": 2, "response_format": "b64_json"}, {"output_format": "jpeg"}):
        response = httpx.post(f"{url}/v1/images/generations", json={**body, **extra}, timeout=60)
        assert response.status_code == 200, response.text
    metrics = httpx.get(f"{url}/metrics").text
    for output_format in ("png", "jpeg"):
        assert f'diffusion_worker_encode_seconds_count{{output_format="{output_format}"}} 1.0' in metrics
        (total,) = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith(f'diffusion_worker_encode_seconds_sum{{output_format="{output_format}"}}')
        ]
        assert total > 0


def test_every_response_carries_a_request_id(worker_url: str) -> None:
    ids = {httpx.get(f"{worker_url}/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
