"""Runs the app under uvicorn; a model that cannot be loaded ends the process with status 1."""

from __future__ import annotations

import logging
import math
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from diffusion_worker.app import build_app, image_store
from diffusion_worker.engine import ModelLoadError, load_engines
from diffusion_worker.logs import configure_logging
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.storage import check_at_start

log = logging.getLogger(__name__)


def serve(settings: WorkerSettings) -> int:
    """Load the model, then serve until SIGINT/SIGTERM; returns the exit status.

    The model is loaded before the port opens so that a bad --model ends the process with one
    clear line and status 1; the app's lifespan then owns (and releases) the loaded pipelines.
    Storage is checked before that (minutes of loading are not spent on a worker whose images
    could never be stored).
    """
    configure_logging(settings.log_level)
    problem = check_at_start(lambda: image_store(settings), settings.storage_timeout)
    if problem is not None:
        log.error("cannot start: --storage-url %s: %s", settings.storage_url, problem)
        return 1
    try:
        engines = load_engines(settings)
    except ModelLoadError as exc:
        log.error("cannot start: %s", exc)
        return 1
    app = build_app(settings, engine_loader=lambda _settings: engines)
    config = uvicorn.Config(
        app,
        host=bind_host(settings.host),
        port=settings.port,
        log_config=None,
        access_log=settings.log_level == "debug",
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_timeout,
        # uvicorn takes whole seconds; rounding up never cuts a drain short (0.5 s is not 0).
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout),
    )
    server = DrainingServer(config, app)
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which would end the process with
    # 128+signal; a handler of our own receives that re-raise, so a clean drain exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _log_signal)
    server.run()
    return 0 if server.started else 1


def bind_host(host: str) -> str:
    """The host uvicorn binds for --host. `::` means every address of both families: asyncio makes
    an IPv6 listening socket IPv6-only, so `::` as such would refuse IPv4 clients (and probes);
    an empty host has it open one socket per family the kernel has (IPv4 alone where IPv6 is
    disabled). So the worker answers on single-stack IPv4, IPv6 and dual-stack clusters alike."""
    return "" if host in ("::", "[::]") else host


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it is draining as soon as a stop signal arrives.

    uvicorn then stops accepting connections and waits (up to --drain-timeout) for the requests in
    flight; /ready answers 503 meanwhile on connections still open.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.app.state.draining:
            log.info("%s received: draining (finishing accepted requests)", signal.Signals(sig).name)
            grace = self.config.timeout_graceful_shutdown
            if grace is not None:
                self.app.state.drain_deadline = time.monotonic() + grace
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def _log_signal(signum: int, _frame: object) -> None:
    log.info("stopped after %s", signal.Signals(signum).name)
