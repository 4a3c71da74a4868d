"""Context-parallel settings the worker cannot honour are refused when the settings are read,
before storage checks and before minutes of loading the model on every rank."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from diffusion_worker.settings import WorkerSettings, describe_settings_error, settings_from_args


def refusal(*args: str) -> str:
    with pytest.raises(ValidationError) as caught:
        settings_from_args(["--model", "m", *args])
    return describe_settings_error(caught.value)


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_a_device_other_than_cuda_is_refused_with_context_parallel(device: str) -> None:
    message = refusal("--context-parallel-size", "2", "--device", device)
    assert f"--device {device!r} cannot be used with --context-parallel-size 2" in message
    assert "CUDA_VISIBLE_DEVICES" in message


@pytest.mark.parametrize("device", [None, "cuda"])
def test_cuda_or_no_device_is_accepted_with_context_parallel(device: str | None) -> None:
    settings = WorkerSettings(model="m", context_parallel_size=2, device=device)
    assert settings.device == device


def test_any_device_is_accepted_without_context_parallel() -> None:
    assert WorkerSettings(model="m", device="cpu").device == "cpu"


def test_context_and_data_parallel_together_are_refused_before_loading() -> None:
    message = refusal("--context-parallel-size", "2", "--data-parallel-size", "2")
    assert "--context-parallel-size and --data-parallel-size cannot both be above 1" in message
