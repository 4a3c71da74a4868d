"""The worker's default local storage does not grow without bound: an image is removed once its URL
has expired (--url-expiry-seconds), as a presigned URL would stop working. Real worker under
uvicorn, the official openai client, the real file system (the default storage location is moved
under the test's own temporary folder)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from diffusion_worker.settings import default_storage_url
from support.worker_server import metric_value

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
EXPIRY = 5  # seconds (the image must still be there once the request is answered); swept every second


def url_image(base: str) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    response = client.images.generate(prompt="p", size="64x64", response_format="url")
    url = (response.data or [])[0].url
    assert url is not None
    return url


def counted_removals(base: str) -> float | None:
    return metric_value(base, "diffusion_worker_expired_images_removed_total")


def test_default_local_storage_removes_an_image_once_its_url_expired(
    start_worker: WorkerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    base = start_worker(storage_url=default_storage_url(), url_expiry_seconds=EXPIRY)
    url = url_image(base)
    stored = list((tmp_path / "tmp" / "diffusion-worker" / "images").rglob("*.png"))
    assert len(stored) == 1
    assert httpx.get(url).status_code == 200
    deadline = time.monotonic() + EXPIRY + 30
    while stored[0].exists():
        assert time.monotonic() < deadline, "the expired image was never removed"
        time.sleep(0.2)
    gone = httpx.get(url)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
    assert not stored[0].parent.exists(), "the request's folder goes with its images"
    assert counted_removals(base) == 1


def test_a_storage_location_the_user_chose_keeps_its_images(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    base = start_worker(storage_url=f"file://{tmp_path / 'mine'}", url_expiry_seconds=1)
    url = url_image(base)
    time.sleep(3)  # past the expiry, with sweeps every second had they been on
    assert httpx.get(url).status_code == 200
    assert len(list((tmp_path / "mine").rglob("*.png"))) == 1
    assert counted_removals(base) == 0
