"""Storage against a real S3 server (SeaweedFS): the start-up check, and URLs signed for the host
clients reach when the worker writes through another."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest
import s3fs

from support.seaweedfs import S3Endpoint

pytestmark = pytest.mark.integration


@contextmanager
def own_bucket(seaweedfs: S3Endpoint, name: str) -> Iterator[None]:
    """A bucket for one test, removed after: each is a SeaweedFS collection with volumes of its own,
    and the test server has few (-volume.max), so buckets left behind starve later tests."""
    fs = s3fs.S3FileSystem(
        key=seaweedfs.access_key, secret=seaweedfs.secret_key,
        client_kwargs={"endpoint_url": seaweedfs.url}, skip_instance_cache=True,
    )  # fmt: skip
    fs.mkdir(name)
    try:
        yield
    finally:
        fs.rm(name, recursive=True)


def serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusion_worker", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_a_store_the_worker_may_not_write_stops_it_before_the_model_loads(
    seaweedfs: S3Endpoint, tmp_path: Path
) -> None:
    """A wrong secret key. Before, such a worker loaded its model, turned ready, and answered every
    url request with a 502 after making its images. (SeaweedFS makes a missing bucket on the first
    write, so that case cannot be shown here.)"""
    with own_bucket(seaweedfs, "start-check"):
        result = serve(
            "--model", "builtin:tiny-sd", "--cache-dir", str(tmp_path), "--port", "1",
            "--storage-url", "s3://start-check/out", env={**seaweedfs.env, "AWS_SECRET_ACCESS_KEY": "wrong"},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot start: --storage-url s3://start-check/out: could not store images under" in result.stderr
    assert "loaded" not in result.stderr, "it stopped before loading the model"
    assert "Traceback" not in result.stderr


def test_urls_are_signed_for_the_host_clients_reach(
    start_worker: Callable[..., str], seaweedfs: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker writes through 127.0.0.1 (an in-cluster Service, say) and signs for `localhost`
    (the address clients use): the URL names that host and the server accepts its signature there."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    port = urlparse(seaweedfs.url).port
    with own_bucket(seaweedfs, "public"):
        url = start_worker(storage_url="s3://public/out", presign_endpoint_url=f"http://localhost:{port}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        image_url = (client.images.generate(prompt="p", extra_body={"nvext": {"seed": 1}}).data or [])[0].url
        assert image_url is not None
        fetched = httpx.get(image_url)
    parsed = urlparse(image_url)
    assert parsed.netloc == f"localhost:{port}" and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in parsed.query
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
