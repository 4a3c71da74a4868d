"""Sizes a pipeline cannot make are refused up front: Flux packs 2x2 latent patches, so width and
height must be multiples of 16; diffusers' Flux resizes any other size with only a warning (the
image would not be the size asked for). Real parts: architecture-shaped Flux and SDXL pipelines
shrunk to a few channels (bench/gpu.py's rehearsal builders), saved and loaded through
`from_pretrained`, the worker under uvicorn, the official openai client."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from diffusion_worker.engine import DiffusersEngine, ModelLoadError, describe_pipeline
from support.bench_scripts import load_bench_script

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]
gpu = load_bench_script("gpu")


def shrunk(builder: str) -> Any:
    configs = gpu.rehearsal_configs(gpu.load_configs(gpu.CONFIG_PATH)["configs"])
    return gpu.BUILDERS[builder](configs, contextlib.nullcontext)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flux") / "pipeline"
    shrunk("flux").save_pretrained(directory, safe_serialization=True)
    return directory


def test_flux_needs_multiples_of_16_and_sd_models_multiples_of_8(tiny_model_dir: Path) -> None:
    from diffusers import DiffusionPipeline

    assert describe_pipeline(shrunk("flux")).size_multiple == 16
    assert describe_pipeline(shrunk("sdxl")).size_multiple == 8
    assert describe_pipeline(DiffusionPipeline.from_pretrained(tiny_model_dir)).size_multiple == 8


def test_a_size_flux_cannot_make_is_a_400_naming_the_multiple(
    start_worker: WorkerFactory, flux_dir: Path
) -> None:
    url = start_worker(model=str(flux_dir), default_inference_steps=2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="p", size="72x72", response_format="b64_json")
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "size"
    assert "multiples of 16 for FluxPipeline" in error["message"]
    made = client.images.generate(prompt="p", size="80x48", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode((made.data or [])[0].b64_json or "")))
    assert image.size == (80, 48)


def test_a_default_size_the_model_cannot_make_stops_start_up(flux_dir: Path, tmp_path: Path) -> None:
    from diffusion_worker.settings import WorkerSettings

    settings = WorkerSettings(model=str(flux_dir), cache_dir=tmp_path, default_size="72x72")
    with pytest.raises(ModelLoadError, match=r"--default-size: .*multiples of 16 for FluxPipeline"):
        DiffusersEngine.load(settings, "cpu")
