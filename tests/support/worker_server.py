"""Runs the real worker: its app under a real uvicorn server in a thread, or the whole
`python -m diffusion_worker serve` process, on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from diffusion_worker.app import EngineLoader, build_app
from diffusion_worker.engine import load_engines
from diffusion_worker.settings import WorkerSettings


@contextmanager
def running_worker(
    settings: WorkerSettings, engine_loader: EngineLoader = load_engines, timeout: float = 120
) -> Iterator[str]:
    """Serve `settings` on 127.0.0.1 (a free port); yields the base URL, e.g. http://127.0.0.1:PORT."""
    app = build_app(settings, engine_loader=engine_loader)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the worker did not start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the worker did not start within {timeout}s")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def metric_value(url: str, series: str) -> float | None:
    """The worker's current value of one Prometheus series (`name{labels}` as /metrics prints it);
    None when /metrics does not list it."""
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def wait_for_queued_images(url: str, count: int, timeout: float = 120) -> None:
    """Until the worker reports `count` images queued or running."""
    deadline = time.monotonic() + timeout
    while f"diffusion_worker_queue_images {count:.1f}" not in httpx.get(f"{url}/metrics", timeout=60).text:
        assert time.monotonic() < deadline, f"{count} images were never queued"
        time.sleep(0.02)


def post_queued(
    url: str, body: dict[str, Any], results: dict[str, httpx.Response], name: str, *, queued_after: int
) -> threading.Thread:
    """POST `body` to the images route from a thread (its response lands in `results[name]`);
    return once the worker reports `queued_after` images queued or running, so requests sent one
    after another queue in that order."""

    def post() -> None:
        results[name] = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)

    thread = threading.Thread(target=post, name=f"post-{name}")
    thread.start()
    wait_for_queued_images(url, queued_after, timeout=30)
    return thread


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class WorkerProcess:
    """A running `python -m diffusion_worker serve`: the process, its base URL and its stderr."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the worker has written to stderr so far."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def worker_process(
    model_dir: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[WorkerProcess]:
    """`python -m diffusion_worker serve` on `model_dir` with extra `flags`, ready to serve. Its stderr
    goes to a file (a pipe nobody reads would block the worker once 64 KiB of logs fill it). The
    process is killed if the test leaves it running."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "diffusion_worker", "serve", "--model", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), *flags]
    with tempfile.TemporaryDirectory(prefix="worker-log-") as logs:
        log_path = Path(logs) / "stderr.log"
        with log_path.open("wb") as stderr:
            process = subprocess.Popen(
                command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=stderr
            )
        worker = WorkerProcess(process, url, log_path)
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited: {worker.log()}")
                try:
                    if httpx.get(f"{url}/ready", timeout=60).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker was not ready within 120s: {worker.log()}")
                time.sleep(0.2)
            yield worker
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
