"""Worker configuration: one class, from which CLI flags and DIFFUSION_WORKER_* env vars derive.

The operator renders `python -m diffusion_worker serve <flags>`; a test parses those flags with
`settings_from_args` so the two sides cannot drift.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DIFFUSION_WORKER_"
# Storage schemes whose images the worker can hand out URLs for without --public-base-url.
URL_SCHEMES = frozenset({"file", "local", "s3", "s3a", "gs", "gcs"})
DEFAULT_MODEL = "builtin:shapes"
Dtype = Literal["auto", "float16", "bfloat16", "float32"]


def default_cache_dir() -> Path:
    """Where models are cached when --cache-dir is not given: $XDG_CACHE_HOME or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusion-worker"


def default_storage_url() -> str:
    """Local image storage used when --storage-url is not given."""
    return "file://" + str(Path(tempfile.gettempdir()) / "diffusion-worker" / "images")


class WorkerSettings(BaseSettings):
    """Everything the worker can be told at start-up."""

    # allow_inf_nan=False: `--drain-timeout inf` passed and crashed the worker after the model loaded.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False)

    # --- model ---
    model: str = Field(
        DEFAULT_MODEL,
        description="Model to serve: a Hugging Face Hub id, a local diffusers pipeline directory, an "
        "s3:// or gs:// pipeline directory (copied into --cache-dir), or builtin:NAME (no download): "
        "builtin:shapes draws coloured shapes, builtin:tiny-sd is "
        "random weights for tests.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of --model.")
    dtype: Dtype = Field(
        "auto",
        description="Weights dtype. auto: bfloat16 on CUDA with bf16 support, float16 on older CUDA, "
        "float32 on CPU.",
    )
    vae_tiling: bool = Field(
        False,
        description="Decode latents larger than the VAE's own sample size in overlapping tiles, so a "
        "large image needs far less memory (at tile seams the pixels differ slightly). "
        "Refused at start-up for a pipeline without a tiling VAE.",
    )
    channels_last: bool = Field(
        False,
        description="Store the UNet's and VAE's activations channels-last (NHWC), the layout GPU tensor "
        "cores read directly; often faster for convolutional models with --compile.",
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention backend for the denoiser (e.g. flash, _native_cudnn, sage). Only "
        "transformer models whose attention dispatches through diffusers (Flux, Qwen-Image, Wan, ...) "
        "can switch; refused at start-up for the others (UNet models, SD3), which always use PyTorch SDPA. "
        "Default: PyTorch SDPA.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the denoiser. The worker compiles at start-up (one image and a full "
        "batch at the default size, with and without guidance) before it opens its port, so no request "
        "pays for it; start-up takes that much longer. A request at another size compiles once more.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode used by --compile."
    )
    pipeline: str | None = Field(
        None,
        description="diffusers pipeline class to load the model with (e.g. StableDiffusionXLPipeline). "
        "Default: the class named in the model's model_index.json.",
    )
    safety_checker: bool = Field(
        True,
        description="Run the model's safety checker where it ships one (diffusers' safety_checker, as "
        "in Stable Diffusion 1.x/2.x checkpoints): a request with a flagged image gets 400 "
        "moderation_blocked. false: do not load it.",
    )
    device: str | None = Field(
        None, description="torch device (cuda, cuda:1, cpu). Default: cuda when present."
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model` and /v1/models lists. Default: --model."
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Directory for downloaded and built-in models (the model-cache volume in a pod).",
    )
    # --- HTTP ---
    host: str = Field(
        "0.0.0.0",
        description="Address to listen on; `::` listens on every IPv4 and IPv6 address (the families the "
        "kernel has), as on single-stack IPv6 and dual-stack clusters.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: SecretStr | None = Field(
        None,
        description="When set, /v1/* requests must send `Authorization: Bearer <key>`. Surrounding "
        "whitespace is dropped; an empty key stops start-up (unset it to disable auth). Prefer the env "
        "var DIFFUSION_WORKER_API_KEY to a flag: flags show in process lists.",
    )
    api_key_scope: Literal["api", "api+metrics", "all"] = Field(
        "api",
        description="Routes that need --api-key: `api` (/v1/*), `api+metrics` (also /metrics), `all` "
        "(also /health and /ready, so probes must send the header).",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (413 above)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # --- storage ---
    storage_url: str = Field(
        default_factory=default_storage_url,
        description="fsspec URL images are written under for response_format=url (file://, s3://, gs://).",
    )
    public_base_url: str | None = Field(
        None,
        description="Base URL that maps to --storage-url for clients (e.g. a CDN); image URL = base + path.",
    )
    presign_endpoint_url: str | None = Field(
        None,
        description="s3:// only: the S3 endpoint clients reach, when the worker writes through another "
        "(AWS_ENDPOINT_URL: an in-cluster MinIO's Service); presigned URLs are signed for this host.",
    )
    url_expiry_seconds: int = Field(
        3600,
        ge=1,
        le=604_800,
        description="Lifetime of presigned s3:// and gs:// URLs when no --public-base-url is set, and of the "
        "worker's own file URLs with the default --storage-url (their images are then removed).",
    )
    storage_timeout: float = Field(
        60,
        gt=0,
        description="Seconds a response_format=url request may spend storing its images (waiting for one "
        "of the worker's upload threads, writing, presigning); then it gets 502 storage_error and what it "
        "wrote is removed. An unreachable endpoint then costs a request this long, never the others.",
    )
    # --- limits ---
    max_inference_steps: int = Field(
        50,
        ge=1,
        le=1000,
        description="Largest nvext.num_inference_steps accepted; lower if the model's scheduler cannot run "
        "that many (DDIM and PNDM stop at 999).",
    )
    max_images_per_request: int = Field(
        10, ge=1, le=128, description="Largest `n` accepted (a lower --max-queue lowers it: a 400 names it)."
    )
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="Largest width*height accepted for `size`.")
    max_prompt_length: int = Field(
        4000, ge=1, description="Longest prompt (and negative prompt), in characters."
    )
    max_batch_size: int = Field(4, ge=1, le=256, description="Most images generated in one pipeline call.")
    check_max_batch: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Before the port opens, make a batch of --max-batch-size images at the default size "
        "(2 steps) and halve it until it fits in device memory; batches are then capped at what fit. "
        "auto: on for CUDA devices. Never with context parallelism (a rank alone needs more memory than "
        "its share).",
    )
    max_queue: int = Field(
        64, ge=1, description="Most images waiting or running; requests beyond it get 429 with Retry-After."
    )
    encode_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Threads that encode images; a PNG is cut into strips that encode in parallel. 0: one "
        "per CPU the process may use (affinity and cgroup CPU limit), at most 16.",
    )
    batch_wait_ms: float = Field(
        0,
        ge=0,
        le=10_000,
        description="How long an idle pipeline waits for more compatible requests to fill a batch. 0: "
        "never wait (batches still form from whatever queued up while the pipeline was busy).",
    )
    request_timeout: float = Field(
        600,
        gt=0,
        description="Seconds a request may wait and run before it gets 504 and its work is dropped. A "
        "pipeline call that can stop at a step and has run twice this long is taken for hung: its pipeline "
        "leaves rotation.",
    )
    drain_timeout: float = Field(
        120,
        ge=0,
        description="On SIGTERM: seconds to finish accepted requests before exiting (keep the pod's "
        "terminationGracePeriodSeconds above it).",
    )
    keep_alive_timeout: int = Field(
        75,
        gt=0,
        description="Seconds an idle client connection stays open. Keep it above the idle timeout of "
        "the clients and load balancers in front (httpx and the openai client: 5 s; AWS ALB: 60 s), "
        "so they close first: a server that closes first races their next request into a reset.",
    )
    # --- defaults for requests that leave a value out ---
    default_inference_steps: int | None = Field(
        None,
        ge=1,
        description="Steps when a request gives none. Default: the model directory's worker_defaults.json, "
        "else the pipeline's own default.",
    )
    default_guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Guidance scale when a request gives none, at most 100 (as a request's). Default: "
        "the model directory's worker_defaults.json, else the pipeline's own default.",
    )
    default_size: str | None = Field(
        None,
        description="WIDTHxHEIGHT when a request gives none or `auto`. Default: the model's native size. "
        "One the model cannot make (not a multiple of its 8, 16 or 32; above --max-pixels) stops start-up.",
    )
    quality_steps: dict[str, int] | None = Field(
        None,
        description="JSON object of inference steps per `quality` value, used when a request gives "
        'no nvext.num_inference_steps, e.g. {"low": 8, "high": 40}. Values not given follow the default '
        "steps D: low 0.25D, medium 0.5D, auto/standard/high D, hd/xhigh 1.5D, max 2D; all capped at "
        "--max-inference-steps.",
    )
    # --- parallelism ---
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="Pipelines loaded, one per device; batches go to any free one. One that fails 3 calls "
        "in a row, or hangs, leaves rotation; with none left /health and /ready answer 503.",
    )
    context_parallel_size: int = Field(
        1,
        ge=1,
        description="GPUs that share every image (context parallelism): the worker starts one process "
        "per GPU and splits the denoiser's attention over them. Transformer models with a diffusers "
        "context-parallel plan only (Flux, Qwen-Image, Wan, ...); refused at start-up for others. "
        "Rank r uses cuda:r: leave --device unset or cuda and pick the GPUs with CUDA_VISIBLE_DEVICES. "
        "Cancellation and streamed previews are off with it.",
    )
    context_parallel_mode: Literal["ulysses", "ring"] = Field(
        "ulysses",
        description="How --context-parallel-size splits attention: ulysses (attention heads; the head "
        "count must divide by the size) or ring (the token sequence).",
    )

    @field_validator("storage_url")
    @classmethod
    def _storage_url_has_scheme(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(
                f"storage_url must be a URL such as file:///data or s3://bucket/prefix, got {value!r}"
            )
        scheme, rest = value.split("://", 1)
        return f"{scheme.lower()}://{rest}".rstrip("/")

    @model_validator(mode="after")
    def _storage_url_clients_can_fetch(self) -> WorkerSettings:
        """Only file://, s3:// and gs:// images get a URL a client can fetch (the worker's own
        route, or a presigned one); another fsspec scheme needs --public-base-url to map it."""
        scheme = self.storage_url.split("://", 1)[0]
        if scheme not in URL_SCHEMES and self.public_base_url is None:
            raise ValueError(
                f"--storage-url {self.storage_url!r}: the worker can hand out URLs for "
                f"{', '.join(f'{s}://' for s in sorted(URL_SCHEMES))} only; with another scheme set "
                "--public-base-url to where clients fetch what is stored there"
            )
        if self.presign_endpoint_url is not None and scheme not in ("s3", "s3a"):
            raise ValueError(f"--presign-endpoint-url is for s3:// storage, not {scheme}://")
        return self

    @model_validator(mode="after")
    def _context_parallel_alone_on_its_gpus(self) -> WorkerSettings:
        """Refused here, before storage checks and loading, rather than after minutes of loading.
        Each rank picks its own GPU (diffusers maps rank r to cuda:(r % the visible count)), so
        --device cannot choose them; CUDA_VISIBLE_DEVICES can."""
        if self.context_parallel_size == 1:
            return self
        if self.data_parallel_size > 1:
            raise ValueError(
                "--context-parallel-size and --data-parallel-size cannot both be above 1 in this version"
            )
        if self.device not in (None, "cuda"):
            raise ValueError(
                f"--device {self.device!r} cannot be used with --context-parallel-size "
                f"{self.context_parallel_size}: each rank r runs on cuda:r (diffusers maps rank r to "
                "cuda:(r % the visible GPU count)); leave --device unset or 'cuda', and choose the GPUs "
                "with CUDA_VISIBLE_DEVICES"
            )
        return self

    @field_validator("quality_steps", mode="before")
    @classmethod
    def _quality_steps_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f'quality_steps must be a JSON object such as {{"low": 8}}, got {value!r}'
                ) from exc
        return value

    @field_validator("quality_steps")
    @classmethod
    def _quality_steps_known(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        from diffusion_worker.protocol import QUALITY_VALUES

        for quality, steps in (value or {}).items():
            if quality not in QUALITY_VALUES:
                raise ValueError(
                    f"quality_steps: unknown quality {quality!r}; known: {', '.join(QUALITY_VALUES)}"
                )
            if steps < 1:
                raise ValueError(f"quality_steps: {quality} must be at least 1 step, got {steps}")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        """Clients strip the token they send, so a key read from a file with its final newline
        (`kubectl create secret --from-file`) could never match; an empty key was a falsy SecretStr
        that turned auth off without a word, though a Secret was meant to turn it on."""
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if not key:
            raise ValueError("api_key is empty or only whitespace; unset it to disable auth")
        return SecretStr(key)

    @field_validator("default_guidance_scale")
    @classmethod
    def _default_guidance_within_request_cap(cls, value: float | None) -> float | None:
        from diffusion_worker.protocol import MAX_GUIDANCE_SCALE

        if value is not None and value > MAX_GUIDANCE_SCALE:
            raise ValueError(f"must be at most {MAX_GUIDANCE_SCALE}, as nvext.guidance_scale in a request")
        return value

    @property
    def effective_served_model_name(self) -> str:
        """The name clients use in `model`."""
        return self.served_model_name or self.model


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The argparse `type` for a field annotation (`int | None` -> int)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if origin is Literal:
        return str
    if annotation in (int, float):
        return annotation
    return str


def _env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _help(name: str, field: Any) -> str:
    """A field's description with its env var and its default (as this environment resolves it)."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, SecretStr) or default is None:
        shown = "none"
    elif isinstance(default, bool):
        shown = str(default).lower()
    else:
        shown = str(default)
    text = f"{field.description} (env {_env_var(name)}; default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def describe_settings_error(error: ValidationError) -> str:
    """One line per problem, naming the flag and env var a user sets, not the pydantic field."""
    lines = []
    for problem in error.errors(include_url=False):
        location = problem["loc"][0] if problem["loc"] else None
        message = problem["msg"].removeprefix("Value error, ")
        if isinstance(location, str) and location in WorkerSettings.model_fields:
            got = problem.get("input")
            shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            lines.append(f"{_flag(location)} / {_env_var(location)}: {message}{shown}")
        else:
            lines.append(message)
    return "\n".join(lines)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per WorkerSettings field; absent flags leave env vars and defaults in force."""
    for name, field in WorkerSettings.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _help(name, field)}
        if field.annotation is bool:  # `--vae-tiling` alone means true; `--vae-tiling false` also works
            kwargs.update(nargs="?", const="true", type=str, metavar="BOOL")
        elif typing.get_origin(field.annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(field.annotation))
        else:
            kwargs["type"] = _scalar_type(field.annotation)
        parser.add_argument(_flag(name), **kwargs)


def settings_from_namespace(namespace: argparse.Namespace) -> WorkerSettings:
    """Build settings from parsed flags; flags win over DIFFUSION_WORKER_* env vars."""
    given = {
        name: getattr(namespace, name)
        for name in WorkerSettings.model_fields
        if getattr(namespace, name, None) is not None
    }
    return WorkerSettings(**given)


def settings_from_args(args: Sequence[str]) -> WorkerSettings:
    """Parse `serve` flags (without the `serve` word) into settings; the operator's tests use this."""
    parser = argparse.ArgumentParser(prog="diffusion_worker serve", exit_on_error=False)
    add_settings_arguments(parser)
    return settings_from_namespace(parser.parse_args(list(args)))
