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
# Libraries that log through a handler of their own unless told otherwise (their logging API).
HUB_LIBRARIES = ("diffusers", "transformers")
# Every diffusers pipeline's warning when a prompt is longer than its text encoder takes ("The
# following part of your input was truncated because CLIP can only handle ...: [<the rest>]").
PROMPT_CUT_MARKER = "input was truncated"
PROMPT_CUT_NOTICE = "a prompt was cut to the text encoder's length (the part cut off is not logged)"


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` from the current context (set per request and per batch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class PromptTextFilter(logging.Filter):
    """Keeps prompts out of the log: the library warning that quotes the cut-off end of one (user
    text, as private as the rest of it) becomes a notice that says only that it happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in HUB_LIBRARIES and PROMPT_CUT_MARKER in str(record.msg):
            record.msg, record.args = PROMPT_CUT_NOTICE, ()
        return True


def in_pool_with_request_id(pool: Executor, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """`function(*args)` on `pool`, in a copy of the caller's context, so its log lines carry the
    request id (what asyncio.to_thread does, on a pool of the caller's choosing)."""
    in_context = contextvars.copy_context().run
    return asyncio.get_running_loop().run_in_executor(pool, in_context, function, *args)


def configure_logging(level: str) -> None:
    """Log to stderr with the request id at `level`; uvicorn's, diffusers' and transformers' loggers
    go through the same handler (the level is the handler's: a library logger's own level would
    otherwise let its warnings through under --log-level error)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(PromptTextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    route_hub_library_logs()


def route_hub_library_logs() -> None:
    """diffusers and transformers print through a stderr handler of their own, in their own format
    and whatever --log-level says (a long prompt's cut-off end included). Their logging API drops
    it and has them propagate to the worker's handler. They are imported here: each adds that
    handler when first imported, undoing any set-up of its logger made before."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it), for one log line."""
    detail = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def log_failure(logger: logging.Logger, what: str, error: BaseException) -> None:
    """One ERROR line naming the failure (exception type and the first line of its message); the
    traceback only at DEBUG, so default logs carry no stack frames or the locals they may quote."""
    logger.error("%s: %s", what, describe_error(error))
    logger.debug("traceback of the failure above", exc_info=error)
