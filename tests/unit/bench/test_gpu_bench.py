"""bench/gpu.py's logic: rehearsal configs, result naming, image comparison, correctness, the time
budget and the order of phases (with stand-in phases), and giving up on a worker that does not start
(a stand-in process that hangs).

The end-to-end rehearsal starts a worker, so it is not a unit test: run
`.venv/bin/python bench/gpu.py --rehearse --out /tmp/gpu-rehearsal` (about a minute).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
import sys
import time
from pathlib import Path
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


def test_a_missing_worker_image_leaves_correctness_unknown_not_passed() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    phases = {"raw_eager": {"finite": True}, "worker_eager": {"error": "boom"}}
    checks = gpu.check_correctness({"raw_eager": image, "worker_eager": None}, phases, 2)
    assert checks["not_checked"] == ["worker_eager_vs_raw_eager"]
    assert checks["passed"] is None  # what could run passed, but the worker was never compared


def test_a_failed_check_fails_correctness_even_when_the_worker_was_not_compared() -> None:
    phases = {"build": {"params_match_reference": False}, "raw_eager": {"finite": True}}
    checks = gpu.check_correctness({"raw_eager": np.zeros((8, 8, 3), np.uint8)}, phases, 2)
    assert checks["passed"] is False


def test_equal_eager_images_pass_correctness_with_compiled_mode_not_run() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    phases = {
        "raw_eager": {"finite": True},
        "worker_eager": {},
        "worker_compiled": {"skipped": "time budget"},
        "raw_compiled": {"skipped": "time budget"},
    }
    checks = gpu.check_correctness({"raw_eager": image, "worker_eager": image}, phases, 2)
    assert checks["passed"] is True
    assert checks["not_checked"] == ["worker_compiled_vs_raw_compiled"]


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


def test_the_compiled_worker_phase_is_estimated_at_three_compiles_with_a_margin() -> None:
    phases = {"worker_eager": {"elapsed_s": 10.0}}
    assert gpu.phase_estimate(phases, "worker", compiled=True, compile_s=40.0) == 10.0 + 1.5 * 3 * 40.0


def test_the_compiled_worker_runs_before_the_raw_compiled_loop() -> None:
    assert gpu.phase_order("eager") == ("raw", "worker")
    assert gpu.phase_order("compiled") == ("worker", "raw")


def test_compile_time_is_the_prior_until_the_compiled_worker_measured_it() -> None:
    phases: dict[str, Any] = {"worker_eager": {"startup_s": 10.0}}
    assert gpu.compile_estimate(phases, prior_s=60.0) == 60.0
    phases["worker_compiled"] = {"startup_s": 100.0}  # three graphs in 90 s more than eager
    assert gpu.compile_estimate(phases, prior_s=60.0) == 30.0
    phases.update(raw_eager={"elapsed_s": 5.0})
    assert gpu.phase_estimate(phases, "raw", compiled=True, compile_s=30.0) == 5.0 + 1.5 * 30.0


def test_a_worker_gets_about_three_minutes_to_start_and_more_to_compile() -> None:
    phases = {"raw_eager": {"load_s": 10.0}}
    eager = gpu.startup_limit(phases, compiled=False, compile_s=60.0)
    assert eager == gpu.EAGER_STARTUP_LIMIT_S + 20.0
    assert gpu.startup_limit(phases, compiled=True, compile_s=60.0) == eager + 2 * 3 * 60.0


def test_the_budget_is_the_shorter_of_time_budget_and_end_at() -> None:
    assert gpu.budget_seconds(540.0, None, now=1000.0) == 540.0
    assert gpu.budget_seconds(540.0, 1300.0, now=1000.0) == 300.0
    assert gpu.budget_seconds(0.0, 1300.0, now=1000.0) == 300.0
    assert gpu.budget_seconds(0.0, None, now=1000.0) is None


def test_the_compiled_ratios_carry_a_note_on_the_different_graphs() -> None:
    phases = {
        f"{side}_{mode}": {"s_per_image": {"median": 1.0}, "single_stream": {"s_per_image": {"median": 1.2}}}
        for side in ("raw", "worker")
        for mode in gpu.MODES
    }
    assert gpu.ratios(phases, "compiled")["note"] == gpu.COMPILED_RATIO_NOTE
    assert gpu.ratios(phases, "compiled")["worker_over_raw_s_per_image_single_stream"] == 1.2
    assert "note" not in gpu.ratios(phases, "eager")
    assert gpu.ratios({}, "compiled") == {}


@pytest.mark.parametrize(
    "line",
    [
        "ERROR diffusion_worker.server cannot start: no model_index.json in /tmp/x",
        "Traceback (most recent call last):",
        "Exception in thread device-cuda:",
    ],
)
def test_a_start_up_failure_is_found_in_the_workers_log(line: str) -> None:
    log = f"INFO loading /tmp/bench-models/sd15\n{line}\n  File ...\n"
    assert gpu.startup_failure(log) == line


def test_an_ordinary_start_up_log_shows_no_failure() -> None:
    log = "INFO loading /tmp/bench-models/sd15\nWARNING torchvision not installed\nINFO ready\n"
    assert gpu.startup_failure(log) is None


def fake_worker(tmp_path: Path, output: str) -> list[str]:
    """A process that writes its pid, prints `output` and then hangs, as a worker whose thread died."""
    script = (
        "import os, sys, time; "
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
        f"print({output!r}, flush=True); time.sleep(120)"
    )
    return [sys.executable, "-c", script, "--port", str(gpu.free_port())]


def assert_stopped(tmp_path: Path) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)


def test_a_worker_whose_thread_died_is_given_up_on_and_stopped(tmp_path: Path) -> None:
    command = fake_worker(tmp_path, "Exception in thread device-cuda:")
    started = time.monotonic()
    with (
        pytest.raises(gpu.WorkerStartError, match="failed at start-up: Exception in thread") as caught,
        gpu.running_worker(command, dict(os.environ), tmp_path / "log", gpu.Deadline(None), 60.0),
    ):
        pass
    assert time.monotonic() - started < 30
    assert "Exception in thread device-cuda:" in caught.value.log_tail
    assert_stopped(tmp_path)


def test_a_worker_not_ready_within_its_start_up_limit_is_stopped(tmp_path: Path) -> None:
    command = fake_worker(tmp_path, "INFO loading")
    with (
        pytest.raises(gpu.WorkerStartError, match="start-up limit 1 s"),
        gpu.running_worker(command, dict(os.environ), tmp_path / "log", gpu.Deadline(None), 1.0),
    ):
        pass
    assert_stopped(tmp_path)


def stub_phases(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float | None]]:
    """Replace building and both sides with stand-ins; returns the phases as they run, each with
    the worker's start-up limit."""
    ran: list[tuple[str, float | None]] = []
    image = np.zeros((8, 8, 3), np.uint8)

    def raw(directory: Path, setting: Any, device: str, compiled: bool, deadline: Any) -> Any:
        ran.append((f"raw_{'compiled' if compiled else 'eager'}", None))
        return {"load_s": 2.0, "finite": True, "s_per_image": {"median": 1.0}}, image

    def worker(directory: Path, setting: Any, device: str, compiled: bool, context: Any, limit: float) -> Any:
        ran.append((f"worker_{'compiled' if compiled else 'eager'}", limit))
        startup_s = 100.0 if compiled else 10.0
        return {"startup_s": startup_s, "single_stream": {"s_per_image": {"median": 1.1}}}, image

    monkeypatch.setattr(gpu, "build_and_save", lambda *args: {"params_match_reference": True})
    monkeypatch.setattr(gpu, "run_raw", raw)
    monkeypatch.setattr(gpu, "run_worker", worker)
    monkeypatch.setattr(gpu, "png_encode_cost", lambda image: {})
    return ran


def bench_sd15(tmp_path: Path, budget_s: float | None) -> dict[str, Any]:
    context = gpu.BenchContext(
        device="cpu",
        rehearse=False,
        rehearse_compile=False,
        worker_args=[],
        tolerance=2.0,
        deadline=gpu.Deadline(budget_s),
        models_dir=tmp_path / "models",
        log_dir=tmp_path / "logs",
        out_path=tmp_path / "result.json",
        result={"models": {}},
    )
    gpu.bench_model("sd15", gpu.GPU_SETTINGS["sd15"], {}, None, list(gpu.MODES), context)
    record: dict[str, Any] = context.result["models"]["sd15"]
    return record


def test_phases_run_raw_then_worker_eager_and_worker_then_raw_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = stub_phases(monkeypatch)
    record = bench_sd15(tmp_path, budget_s=None)
    prior = gpu.COMPILE_PRIOR_S["sd15"]
    assert ran == [
        ("raw_eager", None),
        ("worker_eager", gpu.EAGER_STARTUP_LIMIT_S + 2 * 2.0),
        ("worker_compiled", gpu.EAGER_STARTUP_LIMIT_S + 2 * 2.0 + 2 * 3 * prior),
        ("raw_compiled", None),
    ]
    assert list(record["phases"]) == ["build", "raw_eager", "worker_eager", "worker_compiled", "raw_compiled"]
    assert record["ratios"]["compiled"]["worker_over_raw_s_per_image_single_stream"] == 1.1
    assert record["correctness"]["passed"] is True


def test_a_compiled_worker_phase_that_cannot_finish_is_skipped_and_the_raw_one_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = stub_phases(monkeypatch)
    # sd15's compile prior is 60 s: the worker needs 1.5 * 3 * 60 = 270 s, the raw loop 90 s.
    record = bench_sd15(tmp_path, budget_s=200.0)
    assert [key for key, _ in ran] == ["raw_eager", "worker_eager", "raw_compiled"]
    assert record["phases"]["worker_compiled"]["skipped"].startswith("time budget")
    assert "worker" not in record["compile_speedup"] and "raw" in record["compile_speedup"]
