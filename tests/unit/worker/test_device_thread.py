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


@pytest.mark.parametrize(("device", "selected"), [("cuda", 0), ("cuda:1", 1)])
def test_a_cuda_thread_selects_a_device_index(
    monkeypatch: pytest.MonkeyPatch, device: str, selected: int
) -> None:
    """torch.cuda.set_device refuses a bare `cuda` device (no index): the thread died before its
    first call and every call, the start-up check first, waited forever. Torch's CUDA calls are
    replaced (no GPU here); the index reaches set_device as an int."""
    import torch

    chosen: list[object] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    thread = DeviceThread("pipeline-test", device)
    assert thread.call(lambda: 7) == 7
    assert chosen == [selected]
    thread.stop()


@pytest.mark.timeout(10)
def test_a_thread_that_cannot_select_its_device_fails_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device the thread cannot select (a driver error) fails each call, instead of leaving the
    callers blocked on a thread that is gone. torch.cuda is replaced: no GPU here."""
    import torch

    def refuse(index: object) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    thread = DeviceThread("pipeline-test", "cuda:0")
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"could not select cuda:0.*no CUDA-capable device"):
            thread.call(lambda: 7)
    thread.stop()
