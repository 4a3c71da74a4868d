"""bench/gpu.py's pure logic: rehearsal configs, result naming, image comparison, correctness.

The end-to-end rehearsal starts a worker, so it is not a unit test: run
`.venv/bin/python bench/gpu.py --rehearse --out /tmp/gpu-rehearsal` (about a minute).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from support.bench_scripts import load_bench_script

gpu = load_bench_script("gpu")


@pytest.fixture(scope="module")
def shrunk() -> dict[str, Any]:
    configs: dict[str, Any] = gpu.rehearsal_configs(gpu.load_configs(gpu.CONFIG_PATH)["configs"])
    return configs


def test_shrunk_sd15_config_builds_a_small_unet_with_the_same_blocks(shrunk: dict[str, Any]) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    unet = UNet2DConditionModel(**shrunk["sd15_unet"])
    assert sum(p.numel() for p in unet.parameters()) < 5_000_000
    assert len(unet.down_blocks) == 4  # as SD 1.5: three cross-attention blocks and a plain one
    latents = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        out = unet(latents, 10, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
    assert out.shape == latents.shape


def test_shrunk_configs_agree_across_components(shrunk: dict[str, Any]) -> None:
    clip_l, clip_bigg, t5 = shrunk["clip_l_text"], shrunk["clip_bigg_text"], shrunk["t5_xxl_encoder"]
    sdxl, flux = shrunk["sdxl_unet"], shrunk["flux1_dev_transformer"]
    assert sdxl["cross_attention_dim"] == clip_l["hidden_size"] + clip_bigg["hidden_size"]
    assert sdxl["projection_class_embeddings_input_dim"] == (
        clip_bigg["projection_dim"] + 6 * sdxl["addition_time_embed_dim"]
    )
    assert flux["joint_attention_dim"] == t5["d_model"]
    assert flux["pooled_projection_dim"] == clip_l["hidden_size"]
    assert sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    assert shrunk["sd15_unet"]["sample_size"] * 8 == gpu.REHEARSAL_SIZE


def test_reference_file_has_a_config_and_a_parameter_count_for_every_component() -> None:
    reference = gpu.load_configs(gpu.CONFIG_PATH)
    for components in gpu.COMPONENTS.values():
        assert set(components.values()) <= set(reference["configs"]) & set(reference["params"])


@pytest.mark.parametrize("name", gpu.MODEL_NAMES)
def test_full_size_pipelines_have_exactly_the_reference_parameter_counts(name: str) -> None:
    """Built on the meta device (shapes only, no memory), as gpu.py builds them on the card: a
    config that drifted from the real model is caught here, not in a GPU session's result file."""
    import functools

    reference = gpu.load_configs(gpu.CONFIG_PATH)
    pipeline = gpu.BUILDERS[name](reference["configs"], functools.partial(gpu.models_on, "meta", "bfloat16"))
    counts = gpu.count_parameters(pipeline, name)
    assert counts == {key: reference["params"][key] for key in counts}


@pytest.mark.parametrize(
    ("device_name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA L40S", "l40s"),
    ],
)
def test_card_slug_names_the_card(device_name: str, slug: str) -> None:
    assert gpu.card_slug(device_name) == slug


def test_result_file_is_named_after_card_date_and_models() -> None:
    day = dt.date(2026, 11, 27)
    assert gpu.result_filename("h100", day, list(gpu.MODEL_NAMES), False) == "gpu-h100-2026-11-27.json"
    assert gpu.result_filename("h200", day, ["flux"], False) == "gpu-h200-2026-11-27-flux.json"
    assert gpu.result_filename("cpu", day, list(gpu.MODEL_NAMES), True) == "gpu-rehearsal-cpu-2026-11-27.json"


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_equal_images_pass_through_the_b64_png_round_trip() -> None:
    raw = gpu.to_uint8(np.random.default_rng(0).random((8, 8, 3)))
    result = gpu.compare_images(raw, gpu.decode_b64_png(png_b64(raw)), tolerance=0)
    assert result["passed"] and result["max_abs_diff"] == 0


def test_a_pixel_changed_beyond_tolerance_fails_and_within_passes() -> None:
    raw = np.full((8, 8, 3), 100, dtype=np.uint8)
    changed = raw.copy()
    changed[3, 4, 1] = 105
    assert gpu.compare_images(raw, changed, tolerance=2) == {
        "passed": False,
        "max_abs_diff": 5,
        "mean_abs_diff": round(5 / raw.size, 4),
        "tolerance": 2,
    }
    assert gpu.compare_images(raw, changed, tolerance=5)["passed"]


def test_images_of_different_sizes_fail() -> None:
    result = gpu.compare_images(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8), 2)
    assert not result["passed"] and "shape" in result["reason"]


def test_a_missing_worker_image_is_listed_as_not_checked() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    phases = {"raw_eager": {"finite": True}, "worker_eager": {"error": "boom"}}
    checks = gpu.check_correctness({"raw_eager": image, "worker_eager": None}, phases, 2)
    assert checks["not_checked"] == ["worker_eager_vs_raw_eager"]
    assert checks["passed"]  # the checks that could run passed; the gap is listed, not hidden


def test_where_time_went_splits_mean_latency_by_the_workers_histograms() -> None:
    before = gpu.seconds_sums(
        "diffusion_worker_generation_seconds_sum 1.0\n"
        'diffusion_worker_encode_seconds_sum{output_format="png"} 0.1\n'
        'diffusion_worker_encode_seconds_sum{output_format="jpeg"} 0.05\n'
        "diffusion_worker_generation_seconds_count 3.0\n"
    )
    assert before == {"generation": 1.0, "encode": pytest.approx(0.15)}
    after = {"generation": 3.0, "encode": 0.25}
    split = gpu.where_time_went([1.1, 1.2], before, after)
    assert split == {
        "mean_s_per_image": 1.15,
        "pipeline_call_s": 1.0,
        "encode_s": 0.05,
        "other_s": 0.1,
    }


def test_compiled_images_are_compared_but_only_eager_ones_gate() -> None:
    """Compiled graphs differ (the worker's is dynamic in the batch size, the raw loop's static),
    so their images may differ by rounding: reported, not gating. The eager comparison gates."""
    image = np.zeros((8, 8, 3), np.uint8)
    off = np.full((8, 8, 3), 9, np.uint8)
    phases = {
        mode: {"finite": True} for mode in ("raw_eager", "worker_eager", "raw_compiled", "worker_compiled")
    }
    images = {"raw_eager": image, "worker_eager": image, "raw_compiled": image, "worker_compiled": off}
    checks = gpu.check_correctness(images, phases, 2)
    assert not checks["worker_compiled_vs_raw_compiled"]["passed"]
    assert "informational" in checks["worker_compiled_vs_raw_compiled"]
    assert checks["passed"]
    assert not gpu.check_correctness({**images, "worker_eager": off}, phases, 2)["passed"]


def test_the_compiled_worker_phase_is_estimated_at_three_compiles() -> None:
    phases = {"worker_eager": {"elapsed_s": 10.0}, "raw_compiled": {"first_call_s": 40.0}}
    assert gpu.phase_estimate(phases, "worker", compiled=True) == 130.0
