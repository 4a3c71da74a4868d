"""One long-lived thread per pipeline that makes all of its device calls."""

from __future__ import annotations

import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DeviceThread:
    """Runs calls one at a time on a single daemon thread, each in its caller's context
    (contextvars: the request id in log lines), returning or raising what the call did.

    PyTorch keeps device state per thread: the current CUDA device, and the CUDA graphs that
    torch.compile's `reduce-overhead` and `max-autotune` modes record (one graph tree per thread).
    Graphs recorded by the start-up warm-up on the main thread were of no use to the scheduler's
    thread, which recorded them again on its first requests, and the main thread's graph memory
    stayed allocated beside them. With every call of a pipeline on its own thread, from load to
    shutdown, what the warm-up records is what requests replay.

    A daemon thread, not an executor's: a call that never returns (a driver hang) must not hold
    the process at exit.
    """

    def __init__(self, name: str, device: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        cuda_index = _cuda_index(device)  # here, so a bad device raises in the caller
        self._thread = threading.Thread(target=self._serve, args=(cuda_index,), name=name, daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the thread; blocks until it returns (a call from the thread itself
        runs at once)."""
        if threading.current_thread() is self._thread:
            return function(*args)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((contextvars.copy_context(), future, function, args))
        return future.result()

    def stop(self) -> None:
        """End the thread once the calls already queued have run."""
        self._calls.put(None)

    def _serve(self, cuda_index: int | None) -> None:
        setup_error: BaseException | None = None
        if cuda_index is not None:
            try:
                import torch

                torch.cuda.set_device(cuda_index)  # collectives and caches use the current device
            except BaseException as exc:
                setup_error = exc
        while (item := self._calls.get()) is not None:
            if setup_error is not None:  # every call fails with it, none waits forever
                item[1].set_exception(
                    RuntimeError(f"the device thread could not select cuda:{cuda_index}: {setup_error!r}")
                )
            else:
                _run(*item)
            del item  # nothing of a finished call stays referenced here (its tensors, its images)


def _cuda_index(device: str) -> int | None:
    """The CUDA device index a thread for `device` selects: its own, or the current device for a
    bare `cuda` (torch.cuda.set_device refuses a device without an index); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index
    return int(torch.cuda.current_device()) if index is None else int(index)


def _run(
    context: contextvars.Context,
    future: concurrent.futures.Future[Any],
    function: Callable[..., Any],
    args: Any,
) -> None:
    try:
        result = context.run(function, *args)
    except BaseException as exc:  # handed to the caller, which raises it
        future.set_exception(exc)
    else:
        future.set_result(result)
