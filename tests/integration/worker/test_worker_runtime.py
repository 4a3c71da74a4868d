"""Worker behaviour around the API: auth, S3 storage, storage failure, back-pressure, start-up, CLI."""

from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
import pytest
import s3fs

from support.engines import ObservedEngine, observed_loader
from support.seaweedfs import S3Endpoint
from support.worker_server import free_port, worker_process

WorkerFactory = Callable[..., str]


pytestmark = pytest.mark.integration


def post(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=60, **kwargs)


def test_api_key_is_required_when_configured(start_worker: WorkerFactory) -> None:
    url = start_worker(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="p")
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    response = good.images.generate(prompt="p", response_format="b64_json", extra_body={"nvext": {"seed": 1}})
    assert len(response.data or []) == 1
    assert httpx.get(f"{url}/health").status_code == 200, "probes need no key"
    assert httpx.get(f"{url}/metrics").status_code == 200, "by default neither does /metrics"


@pytest.mark.parametrize(
    ("scope", "open_paths", "closed_paths"),
    [
        ("api+metrics", ["/health", "/ready"], ["/metrics", "/v1/models"]),
        ("all", [], ["/health", "/ready", "/metrics", "/v1/models"]),
    ],
)
def test_api_key_scope_decides_whether_probes_and_metrics_need_the_key(
    start_worker: WorkerFactory, scope: str, open_paths: list[str], closed_paths: list[str]
) -> None:
    url = start_worker(api_key="s3cret", api_key_scope=scope)
    key = {"Authorization": "Bearer s3cret"}
    for path in open_paths:
        assert httpx.get(f"{url}{path}").status_code == 200, path
    for path in closed_paths:
        refused = httpx.get(f"{url}{path}")
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}{path}", headers=key).status_code == 200, path


def test_a_key_read_with_its_final_newline_still_matches(start_worker: WorkerFactory) -> None:
    """A Secret made with `kubectl create secret --from-file` ends in a newline; before, the key kept
    it and no client could match it (the token a client sends is stripped)."""
    url = start_worker(api_key="abc\n", api_key_scope="all")
    for path in ("/v1/models", "/health"):
        assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer abc"}).status_code == 200, path
        assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer abd"}).status_code == 401, path


def test_url_with_s3_storage_on_a_real_seaweedfs_server(
    start_worker: WorkerFactory, seaweedfs: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("images")
    url = start_worker(storage_url="s3://images/generated", url_expiry_seconds=600)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = client.images.generate(prompt="p", n=2, user="carol", extra_body={"nvext": {"seed": 3}})
    urls = [image.url for image in response.data or []]
    assert len(urls) == 2
    same_seed = client.images.generate(
        prompt="p", n=2, response_format="b64_json", extra_body={"nvext": {"seed": 3}}
    )
    for index, image_url in enumerate(urls):
        assert image_url is not None
        parsed = urlparse(image_url)
        assert parsed.netloc == urlparse(seaweedfs.url).netloc and "Signature=" in parsed.query
        key = parsed.path.lstrip("/")
        assert key.startswith("images/generated/users/carol/generations/") and key.endswith(f"/{index}.png")
        stored = fs.cat(key)  # the object exists at the promised key
        assert stored == httpx.get(image_url).content  # and the presigned URL serves it
        assert stored == base64.b64decode((same_seed.data or [])[index].b64_json or "")


def test_storage_failure_is_502_and_the_worker_keeps_serving(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the storage directory should be")
    url = start_worker(storage_url=f"file://{blocker}/images")
    failed = post(url, {"prompt": "p", "nvext": {"num_inference_steps": 1}})
    assert failed.status_code == 502
    assert failed.json()["error"]["type"] == "storage_error"
    assert "data" not in failed.json()
    ok = post(url, {"prompt": "p", "response_format": "b64_json", "nvext": {"num_inference_steps": 1}})
    assert ok.status_code == 200


def test_health_and_metrics_answer_while_an_image_is_being_made(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=True))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, {"prompt": "p", "response_format": "b64_json"})
        assert engines[0].entered.wait(30)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert "diffusion_worker_queue_images 1.0" in httpx.get(f"{url}/metrics", timeout=5).text
        assert not pending.done()
        engines[0].gate.set()
        assert pending.result(timeout=60).status_code == 200


def test_a_failing_pipeline_gives_a_500_error_object_and_the_worker_keeps_serving(
    start_worker: WorkerFactory,
) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(engine_loader=observed_loader(engines, gated=False))
    engines[0].fail_next = RuntimeError("secret internal detail /opt/weights")
    failed = post(url, {"prompt": "p", "response_format": "b64_json"})
    assert failed.status_code == 500
    assert failed.json() == {
        "error": {
            "message": "Internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "secret" not in failed.text and "Traceback" not in failed.text
    assert post(url, {"prompt": "p", "response_format": "b64_json"}).status_code == 200


def test_default_logs_carry_no_traceback_and_never_the_api_key(
    start_worker: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    engines: list[ObservedEngine] = []
    url = start_worker(api_key="s3cret-in-logs", engine_loader=observed_loader(engines, gated=False))
    engines[0].fail_next = RuntimeError("boom")
    key = {"Authorization": "Bearer s3cret-in-logs"}
    assert post(url, {"prompt": "p", "response_format": "b64_json"}, headers=key).status_code == 500
    assert post(url, {"prompt": "p"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "generation failed on cpu: RuntimeError: boom" in caplog.text
    assert not [record for record in caplog.records if record.exc_info], "a traceback reached the log"
    assert "Traceback" not in caplog.text and "s3cret-in-logs" not in caplog.text


def test_full_queue_gives_429_with_retry_after_and_not_ready(start_worker: WorkerFactory) -> None:
    engines: list[ObservedEngine] = []
    url = start_worker(
        engine_loader=observed_loader(engines, gated=True), max_queue=2, max_images_per_request=2
    )
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, {"prompt": "p", "n": 2, "response_format": "b64_json"})
        assert engines[0].entered.wait(30)
        refused = post(url, {"prompt": "q"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["type"] == "server_overloaded"
        assert httpx.get(f"{url}/ready").status_code == 503
        engines[0].gate.set()
        assert len(pending.result(timeout=60).json()["data"]) == 2
    assert httpx.get(f"{url}/ready").status_code == 200
    assert (
        'diffusion_worker_rejected_requests_total{reason="queue_full"} 1.0'
        in httpx.get(f"{url}/metrics").text
    )


def test_data_parallel_pipelines_on_cpu_serve_concurrent_requests(start_worker: WorkerFactory) -> None:
    url = start_worker(data_parallel_size=2, max_batch_size=1)
    with ThreadPoolExecutor(4) as pool:
        bodies = [{"prompt": "p", "response_format": "b64_json", "nvext": {"seed": s}} for s in range(4)]
        results = list(pool.map(lambda body: post(url, body), bodies))
    assert [r.status_code for r in results] == [200] * 4
    images = [r.json()["data"][0]["b64_json"] for r in results]
    assert len(set(images)) == 4
    again = post(url, bodies[2]).json()["data"][0]["b64_json"]
    assert again == images[2], "the same seed gives the same image on either pipeline"


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusion_worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_model_load_failure_exits_nonzero_with_a_clear_message(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "missing"), "--port", "1")
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "model_index.json not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("pipeline", ["StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline"])
def test_a_pipeline_that_cannot_make_images_from_a_prompt_stops_start_up(
    tmp_path: Path, pipeline: str
) -> None:
    """Both load an SD 1.5 model without complaint (SDXL's missing components are set to None).
    Before, every request then failed with a 500, and after three the engine was taken out of
    rotation as if its device had failed: a restart loop that blamed the GPU."""
    result = run_cli(
        "serve", "--model", "builtin:tiny-sd", "--pipeline", pipeline, "--cache-dir", str(tmp_path)
    )
    assert result.returncode == 1
    assert f"cannot start: {pipeline} loaded 'builtin:tiny-sd' but cannot make an image from a prompt" in (
        result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_a_cache_dir_that_cannot_be_used_is_a_clear_start_up_error(tmp_path: Path) -> None:
    """One that cannot be made (here below a file; on a cluster, a read-only or missing mount) was
    an OSError traceback."""
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli(
        "serve",
        "--model",
        "builtin:tiny-sd",
        "--cache-dir",
        str(tmp_path / "a-file" / "cache"),
        "--port",
        "1",
    )
    assert result.returncode == 1
    assert f"cannot start: could not prepare 'builtin:tiny-sd' under --cache-dir {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_builtin_model_names_the_known_ones(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", "builtin:nope", "--cache-dir", str(tmp_path))
    assert result.returncode == 1 and "builtin:tiny-sd" in result.stderr


def test_build_tiny_model_cli_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    result = run_cli("build-tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "tiny" / part).exists()


def test_serve_builtin_model_from_flags_and_env_in_a_real_process(tmp_path: Path) -> None:
    """What `make run` does: a separate process, flags plus DIFFUSION_WORKER_* env, builtin model."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusion_worker", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={
            **os.environ,
            "DIFFUSION_WORKER_MODEL": "builtin:tiny-sd",
            "DIFFUSION_WORKER_CACHE_DIR": str(tmp_path / "cache"),
            "DIFFUSION_WORKER_DEFAULT_INFERENCE_STEPS": "2",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "worker not ready in time"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.images.generate(prompt="a red circle")
        image_url = (response.data or [])[0].url
        assert image_url is not None and httpx.get(image_url).content.startswith(b"\x89PNG")
        assert (tmp_path / "cache" / "builtin" / "tiny-sd" / "model_index.json").is_file()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0


def test_idle_connections_outlive_the_clients_keep_alive(tmp_path: Path, tiny_model_dir: Path) -> None:
    """uvicorn's own default (5 s) equals httpx's and the openai client's keep-alive expiry: under
    load some of their reused connections met a server-side close and failed with a reset (8 of
    3000 requests here). The worker holds idle connections for --keep-alive-timeout instead."""
    flags = ("--keep-alive-timeout", "8", "--storage-url", f"file://{tmp_path}")
    with worker_process(tiny_model_dir, *flags) as worker:
        port = int(urlparse(worker.url).port or 0)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            assert health_over(connection).startswith(b"HTTP/1.1 200")
            time.sleep(6)  # longer than the clients' 5 s: the worker must not have closed yet
            assert health_over(connection).startswith(b"HTTP/1.1 200")
            connection.settimeout(20)
            started = time.monotonic()
            assert connection.recv(4096) == b"", "the worker never closed the idle connection"
            assert time.monotonic() - started >= 6  # closed at 8 s idle, not the clients' 5 s


def test_host_double_colon_answers_on_ipv4_and_ipv6(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What the operator renders (`--host ::`): the kubelet probes the pod's primary IP, IPv6 on a
    single-stack IPv6 cluster. asyncio makes a `::` socket IPv6-only, so bound as such the worker
    would refuse IPv4; both must answer (IPv6 where this machine has it)."""
    with worker_process(tiny_model_dir, "--host", "::", "--storage-url", f"file://{tmp_path}") as worker:
        port = int(urlparse(worker.url).port or 0)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        if not socket.has_ipv6:
            pytest.skip("this Python has no IPv6; IPv4 answered")
        assert httpx.get(f"http://[::1]:{port}/health", timeout=30).status_code == 200


def health_over(connection: socket.socket) -> bytes:
    """GET /health on an open connection; the whole response."""
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: worker\r\n\r\n")
    response = b""
    while not response.endswith(b'{"status":"ok"}'):
        chunk = connection.recv(4096)
        assert chunk, f"the connection closed mid-response: {response!r}"
        response += chunk
    return response
