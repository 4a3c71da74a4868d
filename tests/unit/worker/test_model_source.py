"""How `--model builtin:NAME` and a model directory's worker_defaults.json are resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_worker.engine import ModelInfo, with_model_defaults
from diffusion_worker.model_source import (
    WORKER_DEFAULTS_FILE,
    ModelLocation,
    ModelSourceError,
    model_defaults,
    resolve_model,
)
from diffusion_worker.settings import DEFAULT_MODEL
from diffusion_worker.shapes import WEIGHTS_DIR

INFO = ModelInfo(
    pipeline_class="StableDiffusionPipeline",
    default_size=(64, 64),
    default_steps=50,
    default_guidance_scale=7.5,
    supports_negative_prompt=True,
    supports_guidance_scale=True,
)


def test_default_model_is_the_packaged_shapes_model() -> None:
    assert DEFAULT_MODEL == "builtin:shapes"


def test_builtin_shapes_loads_in_place_from_the_package(tmp_path: Path) -> None:
    location = resolve_model("builtin:shapes", tmp_path)
    assert location == ModelLocation(str(WEIGHTS_DIR), False)
    assert (WEIGHTS_DIR / "model_index.json").is_file()
    assert not (tmp_path / "builtin").exists(), "nothing is copied into the cache dir"


def test_unknown_builtin_lists_packaged_and_built_models(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"builtin:shapes, builtin:tiny-sd"):
        resolve_model("builtin:nope", tmp_path)


def test_model_defaults_come_from_the_model_directory(tmp_path: Path) -> None:
    location = ModelLocation(str(tmp_path), False)
    assert model_defaults(location) == {}
    (tmp_path / WORKER_DEFAULTS_FILE).write_text('{"num_inference_steps": 20, "guidance_scale": 5}')
    assert model_defaults(location) == {"num_inference_steps": 20, "guidance_scale": 5}
    assert model_defaults(ModelLocation("org/model", True)) == {}


def test_unreadable_model_defaults_name_the_file(tmp_path: Path) -> None:
    (tmp_path / WORKER_DEFAULTS_FILE).write_text("[1, 2]")
    with pytest.raises(ModelSourceError, match=WORKER_DEFAULTS_FILE):
        model_defaults(ModelLocation(str(tmp_path), False))


def test_model_defaults_replace_the_pipeline_signature_defaults() -> None:
    info = with_model_defaults(INFO, {"num_inference_steps": 20, "guidance_scale": 5})
    assert (info.default_steps, info.default_guidance_scale) == (20, 5.0)
    assert with_model_defaults(INFO, {}) == INFO


def test_shapes_weights_ship_defaults_and_stay_small() -> None:
    assert model_defaults(ModelLocation(str(WEIGHTS_DIR), False))["num_inference_steps"] <= 25
    size = sum(path.stat().st_size for path in WEIGHTS_DIR.rglob("*") if path.is_file())
    assert size <= 20 * 1024 * 1024
