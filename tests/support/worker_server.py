"""Runs the real worker app under a real uvicorn server on a loopback port, in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
