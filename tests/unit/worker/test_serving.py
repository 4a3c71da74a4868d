"""Limits, defaults and seeds applied to a request before any pipeline runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from diffusion_worker.encoding import ImageEncoder
from diffusion_worker.engine import ModelInfo
from diffusion_worker.errors import APIError
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.protocol import MAX_SEED, ImageGenerationRequest
from diffusion_worker.scheduler import Scheduler
from diffusion_worker.serving import ImageGenerationService, RequestDefaults
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.storage import ImageStore

INFO = ModelInfo(
    pipeline_class="StableDiffusionPipeline",
    default_size=(512, 512),
    default_steps=50,
    default_guidance_scale=7.5,
    supports_negative_prompt=True,
    supports_guidance_scale=True,
)


def service(tmp_path: Path, info: ModelInfo = INFO, **overrides: Any) -> ImageGenerationService:
    settings = WorkerSettings(model="m", storage_url=f"file://{tmp_path}", **overrides)
    metrics = WorkerMetrics()
    scheduler = Scheduler(
        [], max_queue=settings.max_queue, max_batch_size=settings.max_batch_size, metrics=metrics
    )
    store = ImageStore(settings.storage_url, public_base_url=None, url_expiry_seconds=60)
    return ImageGenerationService(settings, info, scheduler, store, metrics, ImageEncoder(1))


def request(**fields: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a cat", **fields})


def test_model_defaults_apply_when_request_and_settings_are_silent(tmp_path: Path) -> None:
    batch = service(tmp_path).build_batch(request(nvext={"seed": 10}))
    assert (batch.width, batch.height, batch.num_inference_steps, batch.guidance_scale) == (512, 512, 50, 7.5)
    assert batch.seeds == [10] and batch.negative_prompts is None


def test_settings_defaults_override_the_model(tmp_path: Path) -> None:
    svc = service(tmp_path, default_size="256x128", default_inference_steps=9, default_guidance_scale=0.0)
    batch = svc.build_batch(request(size="auto"))
    assert (batch.width, batch.height, batch.num_inference_steps, batch.guidance_scale) == (256, 128, 9, 0.0)


def test_default_steps_above_the_cap_are_lowered_to_it(tmp_path: Path) -> None:
    assert RequestDefaults.resolve(WorkerSettings(model="m", max_inference_steps=20), INFO).steps == 20


def test_a_scheduler_limit_below_the_setting_caps_requests_and_is_named(tmp_path: Path) -> None:
    info = dataclasses.replace(INFO, max_steps=999)
    svc = service(tmp_path, info, max_inference_steps=1000, quality_steps={"high": 1000})
    assert svc.build_batch(request(nvext={"num_inference_steps": 999})).num_inference_steps == 999
    assert svc.build_batch(request(quality="high")).num_inference_steps == 999
    with pytest.raises(APIError) as caught:
        svc.build_batch(request(nvext={"num_inference_steps": 1000}))
    assert caught.value.param == "nvext.num_inference_steps"
    assert "at most 999" in caught.value.message
    assert "StableDiffusionPipeline's scheduler" in caught.value.message


def test_a_scheduler_limit_above_the_setting_changes_nothing(tmp_path: Path) -> None:
    svc = service(tmp_path, dataclasses.replace(INFO, max_steps=1000), max_inference_steps=30)
    with pytest.raises(APIError) as caught:
        svc.build_batch(request(nvext={"num_inference_steps": 31}))
    assert "at most 30 (--max-inference-steps)" in caught.value.message


def test_n_images_get_consecutive_seeds_and_their_own_prompts(tmp_path: Path) -> None:
    batch = service(tmp_path).build_batch(request(n=3, nvext={"seed": 0, "negative_prompt": "blur"}))
    assert batch.seeds == [0, 1, 2]
    assert batch.prompts == ["a cat"] * 3 and batch.negative_prompts == ["blur"] * 3


def test_random_seeds_differ_between_requests(tmp_path: Path) -> None:
    svc = service(tmp_path)
    assert svc.build_batch(request()).seeds != svc.build_batch(request()).seeds


def test_every_returned_seed_can_be_sent_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image i uses seed + i: the largest random seed still leaves seed + n - 1 within MAX_SEED."""
    monkeypatch.setattr("secrets.randbelow", lambda bound: bound - 1)  # the largest it can draw
    svc = service(tmp_path)
    seeds = svc.build_batch(request(n=10)).seeds
    assert seeds[-1] == MAX_SEED
    for seed in seeds:
        assert svc.build_batch(request(nvext={"seed": seed})).seeds == [seed]


def test_a_seed_whose_last_image_would_pass_the_limit_is_refused(tmp_path: Path) -> None:
    svc = service(tmp_path)
    assert svc.build_batch(request(n=2, nvext={"seed": MAX_SEED - 1})).seeds == [MAX_SEED - 1, MAX_SEED]
    with pytest.raises(APIError) as refused:
        svc.build_batch(request(n=2, nvext={"seed": MAX_SEED}))
    assert (refused.value.status_code, refused.value.param) == (400, "nvext.seed")
    assert "seed + i" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"n": 11}, 400, "n"),
        ({"nvext": {"num_inference_steps": 51}}, 400, "nvext.num_inference_steps"),
        ({"model": "other"}, 404, "model"),
        ({"size": "8192x8192"}, 400, "size"),
        ({"prompt": "x" * 4001}, 400, "prompt"),
        ({"nvext": {"negative_prompt": "y" * 4001}}, 400, "nvext.negative_prompt"),
    ],
)
def test_limits_reject_with_param(tmp_path: Path, fields: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(APIError) as caught:
        service(tmp_path).build_batch(request(**fields))
    assert (caught.value.status_code, caught.value.param) == (status, param)


def test_negative_prompt_on_a_pipeline_without_it_is_a_400(tmp_path: Path) -> None:
    info = ModelInfo(
        "FluxPipeline", (1024, 1024), 28, 3.5, supports_negative_prompt=False, supports_guidance_scale=True
    )
    with pytest.raises(APIError) as caught:
        service(tmp_path, info).build_batch(request(nvext={"negative_prompt": "x"}))
    assert caught.value.param == "nvext.negative_prompt" and "FluxPipeline" in caught.value.message


def test_served_name_is_accepted_as_model(tmp_path: Path) -> None:
    svc = service(tmp_path, served_model_name="sdxl")
    assert len(svc.build_batch(request(model="sdxl"))) == 1


def test_unknown_field_names_reach_the_log_escaped_and_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Field names come from the client: a newline in one must not forge a second log line."""
    names = {"evil\nERROR forged line": 1, **{f"f{index:02d}": index for index in range(12)}}
    with caplog.at_level("WARNING", logger="diffusion_worker.serving"):
        service(tmp_path).build_batch(request(**names))
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "'evil\\nERROR forged line'" in message
    assert message.endswith("and 3 more")


def test_more_images_than_the_queue_holds_is_a_400_naming_the_queue_limit(tmp_path: Path) -> None:
    """Such a request can never be admitted, so a 429 telling the client to retry would be a lie."""
    svc = service(tmp_path, max_queue=3, max_images_per_request=10)
    assert len(svc.build_batch(request(n=3))) == 3
    with pytest.raises(APIError) as caught:
        svc.build_batch(request(n=4))
    error = caught.value
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", "n")
    assert "at most 3" in error.message and "--max-queue" in error.message and "got 4" in error.message


def test_the_reported_quality_is_the_level_that_runs_the_same_steps(tmp_path: Path) -> None:
    """`auto`, `standard` and `hd` are request-only names; the response names the level made. Once
    --quality-steps sets `high` apart from the default, `auto` is no longer `high`."""
    usual = RequestDefaults.resolve(WorkerSettings(model="m", default_inference_steps=20), INFO)
    assert usual.reported_quality == {"auto": "high", "standard": "high", "hd": "xhigh"}
    apart = RequestDefaults.resolve(
        WorkerSettings(model="m", default_inference_steps=20, quality_steps={"high": 40}), INFO
    )
    assert apart.quality_steps["auto"] == 20 and apart.quality_steps["high"] == 40
    # 20 steps: nearest are medium (10) and xhigh (30), both 10 away; the first in order wins.
    assert apart.reported_quality["auto"] == apart.reported_quality["standard"] == "medium"
    assert apart.reported_quality["hd"] == "xhigh"  # still 30 steps, as xhigh
    svc = service(tmp_path, default_inference_steps=20, quality_steps={"high": 40})
    batch = svc.build_batch(request())
    assert batch.num_inference_steps == 20
    assert svc._echo(request(), batch)["quality"] == "medium"


def test_quality_steps_above_the_cap_are_lowered_with_a_warning_naming_quality_and_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, `{"low": 80}` under a cap of 50 became 50 without a word: `low` then ran more steps
    than `medium` (25), and nothing said why."""
    settings = WorkerSettings(model="m", quality_steps={"low": 80, "high": 40})
    with caplog.at_level("WARNING", logger="diffusion_worker.serving"):
        defaults = RequestDefaults.resolve(settings, INFO)
    assert defaults.quality_steps["low"] == 50 and defaults.quality_steps["high"] == 40
    (record,) = caplog.records
    message = record.getMessage()
    assert "low" in message and "80" in message and "--max-inference-steps (50)" in message


@pytest.mark.parametrize("name", ["seed", "negative_prompt", "num_inference_steps", "guidance_scale"])
def test_an_nvext_field_sent_at_the_top_level_is_a_400_naming_nvext(tmp_path: Path, name: str) -> None:
    """Ignored, a top-level `seed` looked set: the images came with random seeds."""
    with pytest.raises(APIError) as caught:
        service(tmp_path).build_batch(request(**{name: 1, "nvext": {"num_inference_steps": 2}}))
    refused = caught.value
    assert (refused.status_code, refused.param, refused.code) == (400, name, "unknown_parameter")
    assert f"did you mean `nvext.{name}`?" in refused.message


@pytest.mark.parametrize(
    ("output_format", "size", "limit"), [("webp", "16384x8", 16383), ("jpeg", "8x65504", 65500)]
)
def test_a_size_the_output_format_cannot_encode_is_a_400_naming_size_and_format(
    tmp_path: Path, output_format: str, size: str, limit: int
) -> None:
    svc = service(tmp_path, max_pixels=65504 * 8)
    with pytest.raises(APIError) as caught:
        svc.build_batch(request(size=size, output_format=output_format))
    refused = caught.value
    assert (refused.status_code, refused.param, refused.code) == (400, "size", "size_too_large")
    assert f"`output_format` {output_format!r}" in refused.message and str(limit) in refused.message
    assert len(svc.build_batch(request(size=size, output_format="png"))) == 1
