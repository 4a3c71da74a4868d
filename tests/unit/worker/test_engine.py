"""Start-up decisions of the engine module that need no pipeline: the default size, the devices."""

from __future__ import annotations

import dataclasses

import pytest

from diffusion_worker.engine import ModelInfo, ModelLoadError, default_size, select_devices
from diffusion_worker.settings import WorkerSettings

SDXL_LIKE = ModelInfo(
    pipeline_class="StableDiffusionXLPipeline",
    default_size=(1024, 1024),
    default_steps=30,
    default_guidance_scale=5.0,
    supports_negative_prompt=True,
    supports_guidance_scale=True,
)


def test_a_native_size_above_max_pixels_stops_start_up_naming_both_and_a_size_that_fits() -> None:
    """Before, a request without `size` (or `auto`) got the native size though --max-pixels refused
    it to any request that asked for it by name."""
    with pytest.raises(ModelLoadError) as caught:
        default_size(SDXL_LIKE, WorkerSettings(model="m", max_pixels=512 * 512))
    message = str(caught.value)
    assert "native size 1024x1024" in message and "--max-pixels 262144" in message
    assert "--default-size" in message and "512x512" in message


def test_the_suggested_size_keeps_the_shape_and_the_models_multiple() -> None:
    wide = dataclasses.replace(SDXL_LIKE, default_size=(1280, 768), size_multiple=16)
    with pytest.raises(ModelLoadError) as caught:
        default_size(wide, WorkerSettings(model="m", max_pixels=640 * 400))
    assert "e.g. 640x384" in str(caught.value)  # 5:3 as 1280x768, multiples of 16, 245760 pixels


def test_a_default_size_within_max_pixels_serves_a_model_whose_native_size_is_not() -> None:
    settings = WorkerSettings(model="m", max_pixels=512 * 512, default_size="512x512")
    assert default_size(SDXL_LIKE, settings) == (512, 512)
    assert default_size(SDXL_LIKE, WorkerSettings(model="m")) == (1024, 1024)


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports four CUDA devices. There is no GPU here: select_devices only counts them."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.usefixtures("four_gpus")
@pytest.mark.parametrize(
    ("device", "size", "expected"),
    [
        ("cuda:2", 2, ["cuda:2", "cuda:3"]),
        ("cuda:1", 3, ["cuda:1", "cuda:2", "cuda:3"]),
        ("cuda", 2, ["cuda:0", "cuda:1"]),
        (None, 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("cuda:3", 1, ["cuda:3"]),
    ],
)
def test_data_parallel_ranks_start_at_the_device_given(
    device: str | None, size: int, expected: list[str]
) -> None:
    """Before, --device cuda:2 with --data-parallel-size 2 loaded on cuda:0 and cuda:1."""
    assert select_devices(WorkerSettings(model="m", device=device, data_parallel_size=size)) == expected


@pytest.mark.usefixtures("four_gpus")
@pytest.mark.parametrize(
    ("device", "size", "message"),
    [
        ("cuda:3", 2, "--device cuda:3 with --data-parallel-size 2 needs cuda:3..cuda:4; 4 CUDA devices"),
        ("cuda", 5, "--data-parallel-size 5 needs cuda:0..cuda:4; 4 CUDA devices"),
    ],
)
def test_data_parallel_ranks_past_the_last_gpu_are_a_load_error(device: str, size: int, message: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        select_devices(WorkerSettings(model="m", device=device, data_parallel_size=size))
    assert str(caught.value).startswith(message)
