"""Storage outage: the S3 server (a real SeaweedFS) stops while requests stream in, then comes back.

Every response is either a complete 200 whose every URL serves its image, or a 502 error object
with `type: storage_error` (no half responses); the worker keeps answering its health probe; and
once storage is back, requests succeed again without a restart.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import s3fs
from PIL import Image

from support.reliability import Figures, percentile
from support.seaweedfs import SeaweedServer
from support.worker_server import worker_process

pytestmark = pytest.mark.integration

# (requests before, during and after the outage; concurrent clients) per scale
LOAD = {"ci": (6, 6, 6, 3), "soak": (60, 60, 60, 6)}
BODY = {"prompt": "a blue square", "size": "64x64", "n": 2}


def send(url: str, seed: int) -> tuple[int, float, dict[str, Any]]:
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", json={**BODY, "nvext": {"seed": seed}}, timeout=300)
    return response.status_code, time.perf_counter() - started, response.json()


def test_storage_outage_gives_502_storage_errors_then_recovers(
    tmp_path: Path, tiny_model_dir: Path, scale: str, figures: Figures
) -> None:
    before, during, after, concurrency = LOAD[scale]
    server = SeaweedServer(tmp_path / "seaweedfs")
    server.start()
    try:
        fs = s3fs.S3FileSystem(
            key=server.endpoint.access_key,
            secret=server.endpoint.secret_key,
            endpoint_url=server.endpoint.url,
            skip_instance_cache=True,
        )
        fs.mkdir("images")
        flags = ("--storage-url", "s3://images/out", "--default-inference-steps", "2")
        with (
            worker_process(tiny_model_dir, *flags, env=server.endpoint.env) as worker,
            ThreadPoolExecutor(concurrency) as pool,
        ):
            phase_before = list(pool.map(lambda seed: send(worker.url, seed), range(before)))
            server.stop()
            stopped_at = time.perf_counter()
            phase_during = list(pool.map(lambda seed: send(worker.url, seed), range(during)))
            outage_seconds = time.perf_counter() - stopped_at
            health = httpx.get(f"{worker.url}/health", timeout=30).status_code
            server.start()
            phase_after = list(pool.map(lambda seed: send(worker.url, seed), range(after)))
        served = 0
        for status, _, body in phase_before + phase_during + phase_after:
            if status == 200:
                assert len(body["data"]) == 2
                for image in body["data"]:
                    key = urlparse(image["url"]).path.lstrip("/")
                    with fs.open(key, "rb") as stored:
                        assert Image.open(stored).size == (64, 64)
                    served += 1
            else:
                assert status == 502, body
                assert body["error"]["type"] == "storage_error" and "data" not in body
                assert "Traceback" not in body["error"]["message"]
        stored_keys = set(fs.find("images/out"))
    finally:
        server.stop()

    assert [status for status, _, _ in phase_before] == [200] * before
    assert {status for status, _, _ in phase_during} == {502}, "storage was down yet a request succeeded"
    assert [status for status, _, _ in phase_after] == [200] * after, "the worker did not recover"
    assert health == 200
    figures.record(
        "storage_outage",
        requests={"before": before, "during": during, "after": after},
        statuses={
            phase: dict(Counter(str(status) for status, _, _ in results))
            for phase, results in (("before", phase_before), ("during", phase_during), ("after", phase_after))
        },
        p99_seconds_502=percentile([seconds for _, seconds, _ in phase_during], 0.99),
        outage_seconds=round(outage_seconds, 1),
        images_promised_and_served=served,
        objects_stored=len(stored_keys),
    )
