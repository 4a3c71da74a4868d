"""The one settings class: flags and DIFFUSION_WORKER_* env vars derive from it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffusion_worker.cli import build_parser, main
from diffusion_worker.engine import ModelLoadError, select_devices
from diffusion_worker.settings import WorkerSettings, settings_from_args


def test_every_field_has_a_description_and_a_flag() -> None:
    parser = build_parser()
    serve_help = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name, field in WorkerSettings.model_fields.items():
        assert field.description, name
        assert "--" + name.replace("_", "-") in serve_help


def test_help_names_each_flags_env_var_and_default() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    helps = {action.dest: action.help for action in serve._actions}
    assert helps["max_queue"].endswith("(env DIFFUSION_WORKER_MAX_QUEUE; default: 64)")
    assert helps["vae_tiling"].endswith("(env DIFFUSION_WORKER_VAE_TILING; default: false)")
    assert helps["api_key"].endswith("(env DIFFUSION_WORKER_API_KEY; default: none)")


def test_cli_errors_name_the_flag_and_env_var_not_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-queue", "0", "--quality-steps", '{"bogus": 3}']) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: invalid settings:"
    assert (
        "--max-queue / DIFFUSION_WORKER_MAX_QUEUE: Input should be greater than or equal to 1 (got 0)"
        in lines
    )
    assert any(line.startswith("--quality-steps / DIFFUSION_WORKER_QUALITY_STEPS: ") for line in lines)
    assert "max_queue" not in lines, "pydantic's own layout, a field name alone on a line"


def test_flags_parse_into_typed_settings() -> None:
    settings = settings_from_args(
        [
            "--model",
            "org/model",
            "--max-inference-steps",
            "30",
            "--default-guidance-scale",
            "4.5",
            "--dtype",
            "bfloat16",
            "--storage-url",
            "s3://bucket/prefix/",
        ]
    )
    assert settings.model == "org/model"
    assert settings.max_inference_steps == 30
    assert settings.default_guidance_scale == 4.5
    assert settings.dtype == "bfloat16"
    assert settings.storage_url == "s3://bucket/prefix"


def test_env_vars_apply_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_WORKER_MAX_QUEUE", "7")
    monkeypatch.setenv("DIFFUSION_WORKER_MODEL", "from-env")
    settings = settings_from_args(["--model", "from-flag"])
    assert settings.max_queue == 7
    assert settings.model == "from-flag"


def test_api_key_from_env_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_WORKER_API_KEY", "hunter2")
    settings = settings_from_args([])
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    "args", [["--max-inference-steps", "0"], ["--storage-url", "/no/scheme"], ["--port", "70000"]]
)
def test_invalid_values_are_rejected(args: list[str]) -> None:
    with pytest.raises(ValidationError):
        settings_from_args(args)


def test_bad_choice_is_rejected_by_the_parser() -> None:
    with pytest.raises(argparse.ArgumentError, match="int4"):
        settings_from_args(["--dtype", "int4"])


def test_served_model_name_defaults_to_model() -> None:
    assert WorkerSettings(model="m").effective_served_model_name == "m"
    assert WorkerSettings(model="m", served_model_name="n").effective_served_model_name == "n"


def test_readme_documents_every_flag_and_env_var() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for name in WorkerSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme, name
        assert f"`DIFFUSION_WORKER_{name.upper()}`" in readme, name


def test_a_boolean_flag_alone_means_true_and_takes_an_explicit_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).vae_tiling is False
    assert settings_from_args(["--vae-tiling"]).vae_tiling is True
    assert settings_from_args(["--vae-tiling", "false"]).vae_tiling is False
    monkeypatch.setenv("DIFFUSION_WORKER_VAE_TILING", "true")
    assert settings_from_args([]).vae_tiling is True
    with pytest.raises(ValidationError):
        settings_from_args(["--vae-tiling", "sometimes"])


def test_speed_options_parse_from_flags() -> None:
    settings = settings_from_args(
        ["--compile", "--compile-mode", "max-autotune", "--channels-last", "--attention-backend", "flash"]
    )
    assert (settings.compile, settings.compile_mode, settings.channels_last) == (True, "max-autotune", True)
    assert settings.attention_backend == "flash"
    assert settings_from_args([]).compile is False
    with pytest.raises(argparse.ArgumentError):
        settings_from_args(["--compile-mode", "fastest"])


def test_storage_timeout_defaults_to_a_minute_and_reads_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args([]).storage_timeout == 60
    assert settings_from_args(["--storage-timeout", "2.5"]).storage_timeout == 2.5
    monkeypatch.setenv("DIFFUSION_WORKER_STORAGE_TIMEOUT", "9")
    assert settings_from_args([]).storage_timeout == 9
    with pytest.raises(ValidationError):
        WorkerSettings(storage_timeout=0)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "--device 'gpu' is not a torch device"),
        ("cuda", "--device cuda: 0 CUDA devices visible"),
        ("cuda:2", "--device cuda:2: 0 CUDA devices visible"),
    ],
)
def test_a_device_this_machine_lacks_is_a_load_error_naming_the_flag(device: str, message: str) -> None:
    """Before, a raw RuntimeError traceback ("gpu") or a message about --data-parallel-size ("cuda").
    This machine has no CUDA device (the GPU tier tests the other side)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    with pytest.raises(ModelLoadError) as caught:
        select_devices(WorkerSettings(model="m", device=device))
    assert str(caught.value).startswith(message)
    assert select_devices(WorkerSettings(model="m", device="cpu", data_parallel_size=2)) == ["cpu", "cpu"]


@pytest.mark.parametrize("key", ["", " ", "\n"])
def test_an_empty_api_key_is_refused_not_taken_for_no_key(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """Before, DIFFUSION_WORKER_API_KEY="" (an operator-filled Secret left empty) was a falsy
    SecretStr: auth was silently off, even with --api-key-scope all."""
    monkeypatch.setenv("DIFFUSION_WORKER_API_KEY", key)
    with pytest.raises(ValidationError, match="unset it to disable auth"):
        settings_from_args(["--api-key-scope", "all"])


def test_the_api_key_loses_surrounding_whitespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubectl create secret --from-file` keeps the file's final newline; clients never send it."""
    monkeypatch.setenv("DIFFUSION_WORKER_API_KEY", " abc\n")
    settings = settings_from_args([])
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "abc"


@pytest.mark.parametrize("value", ["inf", "nan", "1e400"])
@pytest.mark.parametrize("flag", ["--drain-timeout", "--request-timeout", "--storage-timeout"])
def test_float_settings_must_be_finite(flag: str, value: str) -> None:
    """Before, --drain-timeout inf passed and the worker crashed after loading the model
    (OverflowError in math.ceil when it configured uvicorn)."""
    with pytest.raises(ValidationError, match="finite number"):
        settings_from_args([flag, value])


def test_the_default_guidance_scale_is_capped_like_a_requests() -> None:
    """Before, --default-guidance-scale 1000 was taken though a request may ask for at most 100."""
    assert settings_from_args(["--default-guidance-scale", "100"]).default_guidance_scale == 100
    with pytest.raises(ValidationError, match="at most 100"):
        settings_from_args(["--default-guidance-scale", "1000"])
