"""Logging set-up: standard `logging`, a request id on every line."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` from the current context (set per request and per batch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def in_pool_with_request_id(pool: Executor, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`function(*args)` on `pool`, in a copy of the caller's context, so its log lines carry the
    request id (what asyncio.to_thread does, on a pool of the caller's choosing)."""
    in_context = contextvars.copy_context().run
    return asyncio.get_running_loop().run_in_executor(pool, in_context, function, *args)


def configure_logging(level: str) -> None:
    """Log to stderr with the request id; uvicorn's loggers go through the same handler."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it), for one log line."""
    detail = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def log_failure(logger: logging.Logger, what: str, error: BaseException) -> None:
    """One ERROR line naming the failure (exception type and the first line of its message); the
    traceback only at DEBUG, so default logs carry no stack frames or the locals they may quote."""
    logger.error("%s: %s", what, describe_error(error))
    logger.debug("traceback of the failure above", exc_info=error)
