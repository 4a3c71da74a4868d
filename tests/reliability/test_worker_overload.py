"""Overload: far more concurrent requests than a small --max-queue admits, against a real worker
process. Only 200 and 429 (with Retry-After) come back, the process stays healthy, its memory
stays bounded, and every 200 carries valid images."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from support.reliability import Figures, MemorySampler, percentile
from support.worker_server import worker_process

pytestmark = pytest.mark.integration

# (requests, concurrent clients) per scale
LOAD = {"ci": (120, 24), "soak": (3000, 64)}
MAX_QUEUE = 4
BODY = {"prompt": "a red circle", "size": "64x64", "n": 2, "response_format": "b64_json"}


def send(client: httpx.Client, url: str, seed: int) -> tuple[int, float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(f"{url}/v1/images/generations", json={**BODY, "nvext": {"seed": seed}})
    return response.status_code, time.perf_counter() - started, response


def test_overload_gives_only_200_or_429_and_the_worker_stays_healthy(
    tmp_path: Path, tiny_model_dir: Path, scale: str, figures: Figures
) -> None:
    total, concurrency = LOAD[scale]
    flags = ("--max-queue", str(MAX_QUEUE), "--max-batch-size", "4", "--default-inference-steps", "2")
    flags += ("--storage-url", f"file://{tmp_path}")
    health: list[tuple[int, float]] = []
    done = threading.Event()

    def probe_health(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                health.append((client.get(f"{url}/health").status_code, time.perf_counter() - started))
                done.wait(0.2)

    with worker_process(tiny_model_dir, *flags) as worker:
        process, url = worker.process, worker.url
        with (
            MemorySampler(process.pid) as memory,
            httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client,
        ):
            prober = threading.Thread(target=probe_health, args=(url,), daemon=True)
            prober.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(lambda seed: send(client, url, seed), range(total)))
            elapsed = time.perf_counter() - started
            done.set()
            prober.join()
        assert process.poll() is None, f"the worker died under load: {worker.log()[-4000:]}"
        assert httpx.get(f"{url}/ready", timeout=30).status_code == 200

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, f"the load never filled the queue: {statuses}"
    for status, _, response in results:
        if status == 429:
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"]["type"] == "server_overloaded"
        else:
            data = response.json()["data"]
            assert len(data) == 2
            for image in data:
                decoded = Image.open(io.BytesIO(base64.b64decode(image["b64_json"])))
                assert (decoded.format, decoded.size) == ("PNG", (64, 64))
                decoded.load()
    assert health and all(status == 200 for status, _ in health), "the health probe failed under load"
    half = len(memory.samples) // 2
    first, second = max(memory.samples[:half]), max(memory.samples[half:])
    assert second <= first * 1.25 + 64 * 2**20, f"memory grew under steady load: {first} -> {second} bytes"

    def latencies(code: int) -> list[float]:
        return [seconds for status, seconds, _ in results if status == code]

    record: dict[str, Any] = {
        "requests": total,
        "concurrent_clients": concurrency,
        "max_queue_images": MAX_QUEUE,
        "images_per_request": 2,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "seconds": round(elapsed, 1),
        "p50_seconds_200": percentile(latencies(200), 0.5),
        "p99_seconds_200": percentile(latencies(200), 0.99),
        "p99_seconds_429": percentile(latencies(429), 0.99),
        "health_probes": len(health),
        "p99_seconds_health": percentile([seconds for _, seconds in health], 0.99),
        "rss_mib_max_first_half": round(first / 2**20, 1),
        "rss_mib_max_second_half": round(second / 2**20, 1),
    }
    figures.record("worker_overload", **record)
