"""DeviceThread: every call of a pipeline on one thread, whoever makes it."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffusion_worker.device_thread import DeviceThread

REQUEST = contextvars.ContextVar("request", default="-")


def test_calls_from_any_thread_run_on_the_one_device_thread_in_the_callers_context() -> None:
    """What torch's per-thread state (CUDA graphs of compiled denoisers, the current device)
    needs: the warm-up on the main thread and requests on the scheduler's threads all land on
    the same thread. The caller's context comes along (the request id in log lines)."""
    device = DeviceThread("pipeline-test", "cpu")

    def where() -> tuple[str, str]:
        return threading.current_thread().name, REQUEST.get()

    def as_request(request: str) -> tuple[str, str]:
        REQUEST.set(request)
        return device.call(where)

    with ThreadPoolExecutor(4) as callers:
        seen = list(callers.map(as_request, [f"r{index}" for index in range(8)]))
    assert seen == [("pipeline-test", f"r{index}") for index in range(8)]
    assert device.call(where) == ("pipeline-test", "-")
    device.stop()


def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    device = DeviceThread("pipeline-test", "cpu")

    def fail() -> None:
        raise ValueError("the pipeline refused it")

    with pytest.raises(ValueError, match="the pipeline refused it"):
        device.call(fail)
    assert device.call(lambda: 42) == 42
    # A call made from the thread itself (a step callback that decodes a preview) runs at once.
    assert device.call(lambda: device.call(lambda: "nested")) == "nested"
    device.stop()
