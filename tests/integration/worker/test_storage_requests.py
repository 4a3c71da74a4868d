"""`response_format=url` when storage misbehaves: stuck uploads, the upload timeout, a failed presign,
a local storage folder the worker cannot write.

The worker, its tiny model and uvicorn are real. The storage back ends are fsspec's own in-memory
file system with one thing changed: writes that wait at a gate (a black-holed endpoint the test
can release) or a `sign()` that fails (a bucket the credentials cannot presign for). These are
stand-ins: a real SeaweedFS server cannot be made to hang or refuse a presign on demand.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import httpx
import openai
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from diffusion_worker.storage import UPLOAD_THREADS
from support.worker_server import metric_value

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
BODY = {"prompt": "p", "size": "64x64", "nvext": {"num_inference_steps": 1}}
# asyncio's default executor, which uploads and encoding used to share
DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


class GatedMemoryFileSystem(MemoryFileSystem):
    """In-memory storage whose writes wait until the test opens `gate`; counts writes entered."""

    protocol = "gatedmem"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    gate = threading.Event()
    changed = threading.Condition()
    entered = 0
    finished = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).removeprefix("gatedmem://"))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        cls = type(self)
        with cls.changed:
            cls.entered += 1
            cls.changed.notify_all()
        try:
            assert cls.gate.wait(timeout=120), "the test never opened the gate"
            super().pipe_file(path, value, mode, **kwargs)
        finally:
            with cls.changed:
                cls.finished += 1
                cls.changed.notify_all()

    @classmethod
    def wait_until(cls, condition: Callable[[], bool], timeout: float = 60) -> bool:
        with cls.changed:
            return cls.changed.wait_for(condition, timeout=timeout)

    @classmethod
    def reset(cls) -> None:
        cls.gate.clear()
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.entered = cls.finished = 0


# A scheme the worker cannot hand out URLs for needs a public base URL to map it.
CDN = "https://images.example.com"


class UnsignableMemoryFileSystem(MemoryFileSystem):
    """In-memory storage that calls itself s3 (so the worker presigns URLs) and cannot presign."""

    protocol = ("s3", "unsignable")
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(str(path).removeprefix("s3://"))

    def sign(self, path: str, expiration: int = 100, **kwargs: Any) -> str:
        raise PermissionError("InvalidAccessKeyId: key AKIASECRETKEYID is not valid for bucket secret-bucket")


fsspec.register_implementation("gatedmem", GatedMemoryFileSystem, clobber=True)


@pytest.fixture
def gated_storage() -> Iterator[type[GatedMemoryFileSystem]]:
    """The gated file system, empty and closed; opened at the end so no upload thread stays stuck."""
    GatedMemoryFileSystem.reset()
    yield GatedMemoryFileSystem
    GatedMemoryFileSystem.gate.set()


def post(url: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def test_b64_json_request_does_not_wait_for_stuck_uploads(
    start_worker: WorkerFactory, gated_storage: type[GatedMemoryFileSystem]
) -> None:
    """With more url requests stuck in storage than any thread pool has threads, a b64_json request
    (which never touches storage) still completes while every upload is still held at the gate."""
    url = start_worker(storage_url="gatedmem://bucket/prefix", storage_timeout=300, public_base_url=CDN)
    stuck = max(DEFAULT_EXECUTOR_THREADS, UPLOAD_THREADS) + 2
    with ThreadPoolExecutor(stuck) as pool:
        uploads = [pool.submit(post, url, BODY) for _ in range(stuck)]
        holding = min(DEFAULT_EXECUTOR_THREADS, UPLOAD_THREADS)
        assert gated_storage.wait_until(lambda: gated_storage.entered >= holding)
        answer = post(url, {**BODY, "response_format": "b64_json"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert not gated_storage.gate.is_set() and not any(upload.done() for upload in uploads)
        gated_storage.gate.set()
        assert [upload.result(timeout=120).status_code for upload in uploads] == [200] * stuck


def test_stuck_upload_gets_502_after_the_storage_timeout_and_leaves_nothing(
    start_worker: WorkerFactory, gated_storage: type[GatedMemoryFileSystem]
) -> None:
    url = start_worker(storage_url="gatedmem://bucket/prefix", storage_timeout=1, public_base_url=CDN)
    failed = post(url, {**BODY, "n": 2})
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert (error["type"], error["code"]) == ("storage_error", "storage_unavailable")
    assert failed.headers["x-request-id"] in error["message"]
    # The upload thread is still held: once it is let go, it removes what it wrote.
    assert gated_storage.entered >= 1 and gated_storage.finished == 0
    gated_storage.gate.set()
    assert gated_storage.wait_until(lambda: gated_storage.finished == gated_storage.entered)
    deadline = time.monotonic() + 30
    while gated_storage.store and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gated_storage.store == {}, "an abandoned upload left images behind"
    assert post(url, {**BODY, "response_format": "b64_json"}).status_code == 200


@pytest.fixture
def unsignable_s3(monkeypatch: pytest.MonkeyPatch) -> type[UnsignableMemoryFileSystem]:
    """s3:// served by UnsignableMemoryFileSystem for one test (fsspec's registry, restored after)."""
    from fsspec.registry import _registry

    monkeypatch.setitem(_registry, "s3", UnsignableMemoryFileSystem)
    UnsignableMemoryFileSystem.store.clear()
    return UnsignableMemoryFileSystem


def test_failed_presign_removes_the_images_and_keeps_storage_details_out_of_the_body(
    start_worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture,
    unsignable_s3: type[UnsignableMemoryFileSystem],
) -> None:
    url = start_worker(storage_url="s3://secret-bucket/secret-prefix")
    failed = post(url, {**BODY, "n": 2})
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert (error["type"], error["code"]) == ("storage_error", "storage_unavailable")
    for secret in ("secret-bucket", "secret-prefix", "AKIASECRETKEYID", "unsignable", "PermissionError"):
        assert secret not in failed.text
    assert failed.headers["x-request-id"] in error["message"]
    assert UnsignableMemoryFileSystem.store == {}, "images of a failed request were left in storage"
    assert "secret-bucket" in caplog.text, "the details belong in the worker log"


def test_a_failed_upload_tells_the_official_client_not_to_retry_it(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """Its images are lost, so a retry makes them again: the openai client's two default retries of a
    5xx cost three generations per call. `x-should-retry: false` stops them."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "users").write_text("a file where the users folder must go")  # a real failed write
    url = start_worker()
    sent: list[httpx.Request] = []
    client = openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="unused",  # max_retries left at the client's default (2)
        http_client=httpx.Client(event_hooks={"request": [sent.append]}),
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="p", size="64x64", extra_body={"nvext": {"num_inference_steps": 1}})
    failed = caught.value
    assert failed.status_code == 502 and failed.code == "storage_unavailable"
    assert failed.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1
    assert metric_value(url, "diffusion_worker_images_generated_total") == 1
    assert metric_value(url, 'diffusion_worker_failed_requests_total{reason="storage"}') == 1
