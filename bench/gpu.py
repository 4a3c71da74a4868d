"""GPU benchmark: SD 1.5, SDXL and FLUX.1-dev served by the worker vs the bare diffusers loop.

The models are architecture-exact with random weights (bench/fullsize_configs.json, parameter counts
checked against the reference), built directly on the GPU and saved with `save_pretrained`, so both
sides load them through the ordinary `from_pretrained` path; tokenizers are tiny, built locally,
and pad to full length (77 CLIP tokens, 512 T5 tokens), so every step computes exactly what the
real models compute. No download, no network.

Per model, on one card, in this order (each phase is written to the result file as it ends, so a
run stopped at the device's 10-minute limit still leaves everything it measured):
1. build: construct on the GPU in the benchmark dtype, save to --models-dir (reused when the same
   configs were saved there before, e.g. on a still-warm machine);
2. raw eager: `DiffusionPipeline.from_pretrained(dir, dtype=...).to("cuda")`, then one `pipe(...)`
   call per image with `generator=torch.Generator("cpu").manual_seed(seed)`;
3. worker eager: `python -m diffusion_worker serve` in a subprocess, over HTTP (b64_json): the image
   for the reference seed (compared with the raw one), then seconds per image at concurrency 1
   (split, from the worker's /metrics, into the pipeline call, encoding, and the rest) and images
   per second at concurrency 8 (--max-batch-size 8);
4. worker compiled: as 3 with `serve --compile` (compiled and warmed up before the port opens);
   before the raw compiled phase because the product's path matters more when time runs short;
5. raw compiled: as 2 with `pipe.unet = torch.compile(pipe.unet)` / `pipe.transformer.compile()`
   and a warm-up call (the inductor cache is shared, so it may find kernels the worker compiled).
Then the time to PNG-encode the reference image on the machine's CPU, Pillow vs the worker's
encoder (`png_encode`): a cost the worker pays per image and the raw loop does not.

Each model's `correctness.passed` is true when every gating check passed (architecture-exact
parameters, finite raw images, the worker's eager image equal to the raw one for the same seed),
false when one failed, and null when nothing failed but the worker's eager image was never compared
(its phase failed or was skipped; `not_checked` lists what was not compared). The compiled images
are compared too, for information only, and the compiled `ratios` carry a `note`: the worker's
graph is dynamic in the batch size, the raw loop's static, so their kernels differ.

A worker gets a start-up limit per phase (about 3 minutes eager, more for compiling) and is given
up on early when its log shows `cannot start`, a traceback or a dying thread before it is ready.

Settings: SD 1.5 512x512 30 steps fp16, SDXL 1024x1024 30 steps bf16 (guidance 7.5); FLUX.1-dev
1024x1024 28 steps bf16, guidance 3.5. Results go to `<out>/gpu-<card>-<date>[-<models>].json`.

Device time, estimated before any GPU run: SD 1.5 about 5 minutes, SDXL about 9, FLUX about 14
(34 GB to build and save; compile warm-ups take minutes). So one model, or one mode, per
10-minute call: `--model sd15`, `--model sdxl`, `--model flux --modes eager`, then
`--model flux --modes compiled` on the still-warm machine (the saved model is reused if /tmp
survived). `--all` runs every model in sequence; like every run it stops starting phases that
would not end within --time-budget (default 540 s, counted from the start of `main`) or before
--end-at (a Unix time: `bench/gpu_session.sh` passes its own end, so installing, the GPU tests and
this script's imports all count) and records them as skipped.

On the device machine (Python 3.12 and torch, no diffusers/fastapi/pydantic; wheels from
`bench/gpu_wheels.sh`, carried as `.whl`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:worker && \
        python3 bench/gpu.py --all --out $OUT

    python3 bench/gpu.py --model sd15 --out $OUT      # instead of --all: one model per call

The opt-in GPU tests run from the same install (pytest is among the wheels). `bench/gpu_session.sh`
does all of it in one device call: install, an import check, `pytest -m gpu tests/gpu`, then this
script for MODELS (default sd15) within what is left of SESSION (570) seconds, five files under
$OUT (the device returns at most 8, so `--all`, with a worker log per phase, is not run that way).

Extra worker flags: `--worker-arg=--channels-last`. (`--attention-backend flash` needs the
flash-attn package, which neither the device nor the carried wheels have.)

Rehearsal: the same code path on the CPU with shrunk models, 64x64, 2 steps, 1 thread, in about a
minute and a half. Compiled mode is left out (torch.compile on one CPU thread takes minutes per
model); `--rehearse-compile` includes it:

    .venv/bin/python bench/gpu.py --rehearse --out /tmp/gpu-rehearsal
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import inspect
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

PROMPT = "a red circle on a blue background"
MODEL_NAMES = ("sd15", "sdxl", "flux")
MODES = ("eager", "compiled")
CONCURRENCY = 8
MAX_BATCH_SIZE = 8
REFERENCE_SEED = 0
REHEARSAL_SIZE = 64
REHEARSAL_STEPS = 2
# Measured here (2 cores shared with other work): compiling the tiny SD 1.5 UNet took 183 s on one
# thread, and the worker's compile warm-up (4 calls) did not finish in 6 minutes.
REHEARSAL_COMPILE_SKIPPED = (
    "rehearsal: torch.compile on one CPU thread takes minutes per model (183 s for the tiny SD 1.5 "
    "UNet alone); pass --rehearse-compile to include it"
)
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
BENCH_DIR = Path(__file__).resolve().parent
CONFIG_PATH = BENCH_DIR / "fullsize_configs.json"
WORKER_DIR = BENCH_DIR.parent / "worker"
BUILD_MARKER = "BENCH_BUILD.json"
LOG_TAIL_LINES = 25
# A worker's start-up, eager: imports, loading, the batch-size check (plus twice the raw load time,
# for models that take long to read). Compiled start-ups get STARTUP_COMPILE_FACTOR times the
# estimated compile time on top.
EAGER_STARTUP_LIMIT_S = 180.0
STARTUP_COMPILE_FACTOR = 2.0
# Lines in a worker's log that mean it will never become ready: the server's own refusal, an
# uncaught exception, a thread that died (the calls it should run would wait forever).
STARTUP_FAILURE_MARKERS = ("cannot start", "Traceback (most recent call last)", "Exception in thread")
# Graphs the worker compiles before it is ready: the batch-size check's full batch (CUDA only), a
# dynamic batch, and the warm-up's single image at guidance 1 (TORCH_LOGS=recompiles on torch 2.11
# showed all three for SD 1.5).
WORKER_COMPILE_GRAPHS = 3
# Compile times vary from run to run: a compiled phase starts only if 1.5x its estimate fits.
COMPILE_MARGIN = 1.5
# Seconds one cold torch.compile of the denoiser is assumed to take before any is measured (the
# worker's compiled phase runs first, so its start-up is the first measurement). Guesses for an
# H100-class card, not measurements.
COMPILE_PRIOR_S = {"sd15": 60.0, "sdxl": 120.0, "flux": 180.0}
# Seconds building a model with random weights on the GPU and saving it takes (FLUX.1-dev: 34 GB
# written), so that the build of a model that cannot be measured in the time left does not start.
# Guesses, not measurements.
BUILD_PRIOR_S = {"sd15": 30.0, "sdxl": 60.0, "flux": 180.0}
COMPILED_RATIO_NOTE = (
    "the worker's compiled graph is dynamic in the batch size (it batches requests), the raw loop's "
    "static at one image: their kernels differ, so this ratio is not serving overhead alone"
)


@dataclass(frozen=True)
class ModelSetting:
    """How one model is generated and how many images each measurement takes."""

    name: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    dtype: str
    runs: int
    concurrent_requests: int

    @property
    def size(self) -> str:
        """`WIDTHxHEIGHT`, as the images API takes it."""
        return f"{self.width}x{self.height}"


GPU_SETTINGS = {
    "sd15": ModelSetting("sd15", 512, 512, 30, 7.5, "float16", runs=5, concurrent_requests=24),
    "sdxl": ModelSetting("sdxl", 1024, 1024, 30, 7.5, "bfloat16", runs=3, concurrent_requests=16),
    "flux": ModelSetting("flux", 1024, 1024, 28, 3.5, "bfloat16", runs=2, concurrent_requests=8),
}

# Pipeline attribute -> key in fullsize_configs.json ("configs" and "params").
COMPONENTS = {
    "sd15": {"unet": "sd15_unet", "vae": "sd_vae", "text_encoder": "clip_l_text"},
    "sdxl": {
        "unet": "sdxl_unet",
        "vae": "sd_vae",
        "text_encoder": "clip_l_text",
        "text_encoder_2": "clip_bigg_text",
    },
    "flux": {
        "transformer": "flux1_dev_transformer",
        "vae": "flux_vae",
        "text_encoder": "clip_l_text",
        "text_encoder_2": "t5_xxl_encoder",
    },
}


def rehearsal_setting(setting: ModelSetting) -> ModelSetting:
    """The CPU rehearsal's version of a setting: tiny images, 2 steps, fp32, few runs."""
    return dataclasses.replace(
        setting,
        width=REHEARSAL_SIZE,
        height=REHEARSAL_SIZE,
        steps=REHEARSAL_STEPS,
        dtype="float32",
        runs=2,
        concurrent_requests=CONCURRENCY,
    )


# --- configs -------------------------------------------------------------------------------------


def load_configs(path: Path) -> dict[str, Any]:
    """The reference file: `configs` (constructor kwargs) and `params` (expected parameter counts)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword defaults of `cls.__init__`, e.g. the block layout a minimal UNet config relies on."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def per_block(value: Any, blocks: int, small: int) -> Any:
    """`small` in the shape of `value`: a list of `blocks` entries where the config has a list."""
    return [small] * blocks if isinstance(value, (list, tuple)) else small


def shrink_unet(
    config: dict[str, Any], *, cross_attention_dim: int, sample_size: int, text_embeds_dim: int | None = None
) -> dict[str, Any]:
    """A few-channel UNet with the same block layout; `text_embeds_dim` sizes SDXL's added embedding."""
    from diffusers import UNet2DConditionModel

    full = {**constructor_defaults(UNet2DConditionModel), **config}
    blocks = len(full["down_block_types"])
    small: dict[str, Any] = {
        "down_block_types": list(full["down_block_types"]),
        "up_block_types": list(full["up_block_types"]),
        "block_out_channels": [32 * min(index + 1, 2) for index in range(blocks)],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": per_block(full["attention_head_dim"], blocks, 2),
        "cross_attention_dim": cross_attention_dim,
        "sample_size": sample_size,
    }
    if "transformer_layers_per_block" in config:
        small["transformer_layers_per_block"] = per_block(config["transformer_layers_per_block"], blocks, 1)
    if "addition_time_embed_dim" in config:
        if text_embeds_dim is None:
            raise ValueError("a UNet with added time embeddings needs text_embeds_dim")
        small["addition_time_embed_dim"] = 8
        # SDXL: pooled text embedding plus six size/crop numbers, each embedded in that many channels.
        small["projection_class_embeddings_input_dim"] = text_embeds_dim + 6 * 8
    return {**config, **small}


def shrink_vae(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """A few-channel VAE with the same number of blocks (so the same 8x downscale)."""
    blocks = len(config["block_out_channels"])
    channels = [16 * min(index + 1, 2) for index in range(blocks)]
    return {
        **config,
        "block_out_channels": channels,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": image_size,
    }


def rehearsal_configs(configs: dict[str, Any], image_size: int = REHEARSAL_SIZE) -> dict[str, Any]:
    """Every config shrunk to a few channels and layers, kept consistent across components
    (UNet cross-attention width = text encoder widths, Flux joint width = T5 width, ...)."""
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    }
    t5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}
    latent = image_size // 8
    return {
        "clip_l_text": {**configs["clip_l_text"], **text},
        "clip_bigg_text": {**configs["clip_bigg_text"], **text},
        "t5_xxl_encoder": {**configs["t5_xxl_encoder"], **t5},
        "sd_vae": shrink_vae(configs["sd_vae"], image_size),
        "flux_vae": shrink_vae(configs["flux_vae"], image_size),
        "sd15_unet": shrink_unet(configs["sd15_unet"], cross_attention_dim=32, sample_size=latent),
        "sdxl_unet": shrink_unet(
            configs["sdxl_unet"], cross_attention_dim=32 + 32, sample_size=latent, text_embeds_dim=32
        ),
        "flux1_dev_transformer": {
            **configs["flux1_dev_transformer"],
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": t5["d_model"],
            "pooled_projection_dim": text["hidden_size"],
            "axes_dims_rope": [4, 6, 6],
        },
    }


def config_digest(name: str, configs: dict[str, Any], dtype: str) -> str:
    """Identifies a saved model: same digest, same architecture and dtype (so it can be reused)."""
    used = {key: configs[key] for key in COMPONENTS[name].values()}
    text = json.dumps({"model": name, "dtype": dtype, "configs": used}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- building ------------------------------------------------------------------------------------


@contextlib.contextmanager
def models_on(device: str, dtype: str) -> Iterator[None]:
    """Modules constructed inside are created on `device` in `dtype`, with their usual random init
    run there (a 12B model is never materialised in fp32, nor initialised on the CPU)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# Enters models_on(device, dtype): builders construct models inside it, and schedulers and
# tokenizers (which keep their small tensors on the CPU) outside.
Placement = Callable[[], contextlib.AbstractContextManager[None]]


def build_clip_tokenizer() -> Any:
    """The repo's byte-level CLIP tokenizer (no merges), padding to CLIP's 77 tokens."""
    from transformers import CLIPTokenizer

    from diffusion_worker.tiny_model import build_clip_tokenizer_vocab

    return CLIPTokenizer(vocab=build_clip_tokenizer_vocab(), merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer() -> Any:
    """A character-level unigram T5 tokenizer (ids 0-2 are pad, eos, unk as in T5), 512 tokens."""
    import string

    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_text_config(config: dict[str, Any], tokenizer: Any) -> Any:
    """A CLIPTextConfig whose special-token ids are the tiny tokenizer's (the pooled output looks
    for its end-of-text id)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_sd15(configs: dict[str, Any], placement: Placement) -> Any:
    """StableDiffusionPipeline (PNDM scheduler as shipped with SD 1.5, no safety checker)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusion_worker.tiny_model import assemble_sd_pipeline

    tokenizer = build_clip_tokenizer()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    with placement():
        unet = UNet2DConditionModel(**configs["sd15_unet"])
        vae = AutoencoderKL(**configs["sd_vae"])
        text_encoder = CLIPTextModel(clip_text_config(configs["clip_l_text"], tokenizer))
    return assemble_sd_pipeline(tokenizer, text_encoder, vae, unet, scheduler)


def build_sdxl(configs: dict[str, Any], placement: Placement) -> Any:
    """StableDiffusionXLPipeline (Euler scheduler as shipped with SDXL base, no watermarker)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    with placement():
        unet = UNet2DConditionModel(**configs["sdxl_unet"])
        vae = AutoencoderKL(**configs["sd_vae"])
        text_encoder = CLIPTextModel(clip_text_config(configs["clip_l_text"], tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(configs["clip_bigg_text"], tokenizer))
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_flux(configs: dict[str, Any], placement: Placement) -> Any:
    """FluxPipeline (flow-matching scheduler with FLUX.1-dev's dynamic shift)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    with placement():
        transformer = FluxTransformer2DModel(**configs["flux1_dev_transformer"])
        vae = AutoencoderKL(**configs["flux_vae"])
        text_encoder = CLIPTextModel(clip_text_config(configs["clip_l_text"], tokenizer))
        text_encoder_2 = T5EncoderModel(T5Config(**configs["t5_xxl_encoder"]))
    return FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(),
        scheduler=scheduler,
    )


BUILDERS: dict[str, Callable[[dict[str, Any], Placement], Any]] = {
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "flux": build_flux,
}


def count_parameters(pipeline: Any, name: str) -> dict[str, int]:
    """Parameters of each component, keyed like fullsize_configs.json's `params`."""
    return {
        key: sum(p.numel() for p in getattr(pipeline, attribute).parameters())
        for attribute, key in COMPONENTS[name].items()
    }


def directory_size(directory: Path) -> int:
    """Bytes of all files under `directory`."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def build_and_save(
    name: str,
    configs: dict[str, Any],
    expected_params: dict[str, int] | None,
    device: str,
    dtype: str,
    directory: Path,
) -> dict[str, Any]:
    """Build the pipeline on `device` and save it to `directory` (reused if the digest matches)."""
    import torch

    digest = config_digest(name, configs, dtype)
    marker = directory / BUILD_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("digest") == digest:
        saved = json.loads(marker.read_text())
        return {**saved, "reused": True, "directory": str(directory)}
    for stale in [directory, *directory.parent.glob(f".{directory.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # other configs, or a save that was cut off
    directory.parent.mkdir(parents=True, exist_ok=True)
    removed: list[str] = []
    if expected_params is not None:
        bytes_per_param = torch.finfo(getattr(torch, dtype)).bits // 8
        needed = sum(expected_params[key] for key in COMPONENTS[name].values()) * bytes_per_param
        removed = make_room(directory.parent, needed, keep=directory)
    started = time.perf_counter()
    torch.manual_seed(0)  # the same weights every time (seeds CUDA too)
    pipeline = BUILDERS[name](configs, functools.partial(models_on, device, dtype))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    params = count_parameters(pipeline, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    started = time.perf_counter()
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        save_s = time.perf_counter() - started
        record: dict[str, Any] = {
            "digest": digest,
            "dtype": dtype,
            "build_s": round(build_s, 2),
            "save_s": round(save_s, 2),
            "size_gib": round(directory_size(staging) / 2**30, 3),
            "params": params,
        }
        if expected_params is not None:
            expected = {key: expected_params[key] for key in params}
            record["params_match_reference"] = params == expected
        (staging / BUILD_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        staging.replace(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        del pipeline
        release_memory(device)
    return {**record, "reused": False, "directory": str(directory), "removed_to_make_room": removed}


def make_room(models_dir: Path, needed: int, keep: Path) -> list[str]:
    """Delete other models this script saved in `models_dir` until `needed` bytes (plus 5%) are
    free; returns what was deleted. FLUX.1-dev alone is 34 GB in bf16."""
    removed: list[str] = []
    for other in sorted(models_dir.iterdir()):
        if shutil.disk_usage(models_dir).free >= needed * 1.05:
            break
        if other != keep and (other / BUILD_MARKER).is_file():
            shutil.rmtree(other)
            removed.append(str(other))
    free = shutil.disk_usage(models_dir).free
    if free < needed * 1.05:
        raise RuntimeError(f"{needed / 2**30:.1f} GiB needed in {models_dir}, {free / 2**30:.1f} GiB free")
    return removed


def release_memory(device: str) -> None:
    """Drop compiled graphs and cached blocks so the next phase starts with the device empty."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- images and statistics -----------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as 8-bit pixels, rounded exactly as diffusers' `numpy_to_pil` does."""
    return np.asarray((image * 255).round().astype("uint8"))


def decode_b64_png(text: str) -> np.ndarray:
    """The pixels of a base64 PNG from the images API, as an RGB uint8 array."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("RGB"))


def compare_images(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Largest per-pixel difference and whether it is within `tolerance` (0-255 scale)."""
    if expected.shape != actual.shape:
        return {
            "passed": False,
            "reason": f"shape {list(actual.shape)} != {list(expected.shape)}",
            "tolerance": tolerance,
        }
    difference = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    max_diff = int(difference.max())
    return {
        "passed": max_diff <= tolerance,
        "max_abs_diff": max_diff,
        "mean_abs_diff": round(float(difference.mean()), 4),
        "tolerance": tolerance,
    }


def image_stats(image: np.ndarray) -> dict[str, float]:
    """Mean and spread of the pixels, so a flat (all-black, saturated) image shows in the record."""
    return {"pixel_mean": round(float(image.mean()), 2), "pixel_std": round(float(image.std()), 2)}


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max (seconds) and how many values they come from."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def card_slug(device_name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`, `NVIDIA A100-SXM4-80GB` -> `a100`,
    `NVIDIA GeForce RTX 4090` -> `rtx4090`: the result file's card name."""
    words = [w for w in re.split(r"[\s_-]+", device_name) if w.lower() not in {"nvidia", "geforce", "tesla"}]
    for index, word in enumerate(words):
        if any(c.isdigit() for c in word):
            prefix = words[index - 1] if index and word.isdigit() else ""
            return re.sub(r"[^a-z0-9]", "", (prefix + word).lower())
    return re.sub(r"[^a-z0-9]", "", "".join(words).lower()) or "gpu"


def result_filename(card: str, date: dt.date, models: list[str], rehearsal: bool) -> str:
    """`gpu-h100-2026-11-26.json` for all models, `gpu-h100-2026-11-26-flux.json` for a subset,
    `gpu-rehearsal-cpu-2026-11-26.json` for the rehearsal."""
    stem = f"gpu-rehearsal-{card}" if rehearsal else f"gpu-{card}"
    suffix = "" if sorted(models) == sorted(MODEL_NAMES) else "-" + "-".join(models)
    return f"{stem}-{date.isoformat()}{suffix}.json"


# --- time budget ---------------------------------------------------------------------------------


@dataclass
class Deadline:
    """Wall-clock budget of the whole run; None is unlimited."""

    budget_s: float | None
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def remaining(self) -> float:
        """Seconds left (infinite without a budget)."""
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def allows(self, seconds: float) -> bool:
        """Whether something expected to take `seconds` ends within the budget."""
        return self.remaining() >= seconds


def budget_seconds(time_budget_s: float, end_at: float | None, now: float) -> float | None:
    """Seconds the run may take from `now` (a Unix time): the shorter of --time-budget (0: none) and
    what is left until --end-at; None when neither is given."""
    limits = [time_budget_s] if time_budget_s else []
    if end_at is not None:
        limits.append(end_at - now)
    return min(limits) if limits else None


# --- raw diffusers -------------------------------------------------------------------------------


def call_kwargs(setting: ModelSetting, seed: int) -> dict[str, Any]:
    """Arguments of one `pipe(...)` call, one image (Flux takes no negative prompt; none is sent)."""
    import torch

    return {
        "prompt": PROMPT,
        "num_inference_steps": setting.steps,
        "guidance_scale": setting.guidance_scale,
        "height": setting.height,
        "width": setting.width,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }


def compile_raw(pipe: Any) -> str:
    """What a user writes to compile the denoiser; returns that line for the record."""
    import torch

    if getattr(pipe, "unet", None) is not None:
        pipe.unet = torch.compile(pipe.unet)
        return "pipe.unet = torch.compile(pipe.unet)"
    pipe.transformer.compile()
    return "pipe.transformer.compile()"


def run_raw(
    directory: Path, setting: ModelSetting, device: str, compiled: bool, deadline: Deadline
) -> tuple[dict[str, Any], np.ndarray]:
    """Load with `from_pretrained`, make the reference image, then time one image per call."""
    import torch
    from diffusers import DiffusionPipeline

    record: dict[str, Any] = {}
    started = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(directory, dtype=getattr(torch, setting.dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    record["load_s"] = round(time.perf_counter() - started, 2)
    if compiled:
        record["compile"] = compile_raw(pipe)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        started = time.perf_counter()
        output = pipe(**call_kwargs(setting, REFERENCE_SEED), output_type="np").images[0]
        record["first_call_s"] = round(time.perf_counter() - started, 2)  # includes compiling
        record["finite"] = bool(np.isfinite(output).all())
        reference = to_uint8(np.nan_to_num(output))
        record.update(image_stats(reference))
        latencies: list[float] = []
        for seed in range(1, setting.runs + 1):
            if latencies and not deadline.allows(2 * max(latencies)):
                record["stopped_early"] = "time budget"
                break
            started = time.perf_counter()
            pipe(**call_kwargs(setting, seed))
            latencies.append(time.perf_counter() - started)
        record["s_per_image"] = summary(latencies)
        record["images_per_s"] = round(1 / statistics.median(latencies), 4)
        if device.startswith("cuda"):
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    finally:
        del pipe
        release_memory(device)
    return record, reference


# --- the worker over HTTP ------------------------------------------------------------------------


class WorkerStartError(Exception):
    """The worker exited or never became ready; `log_tail` holds the end of its log."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log file."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def startup_failure(log_text: str) -> str | None:
    """The first line of a worker's start-up log that says it will never become ready, if any."""
    for line in log_text.splitlines():
        if any(marker in line for marker in STARTUP_FAILURE_MARKERS):
            return line.strip()
    return None


def worker_command(
    directory: Path, setting: ModelSetting, device: str, port: int, compiled: bool, extra: list[str]
) -> list[str]:
    """`python -m diffusion_worker serve ...` for one model; the default size and guidance are the
    benchmark's so that `--compile` warms up exactly the shapes the requests use."""
    command = [
        sys.executable,
        "-m",
        "diffusion_worker",
        "serve",
        "--model",
        str(directory),
        "--served-model-name",
        setting.name,
        "--dtype",
        setting.dtype,
        "--device",
        device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(MAX_BATCH_SIZE),
        "--max-queue",
        "1024",
        "--max-inference-steps",
        "1000",
        "--default-size",
        setting.size,
        "--default-guidance-scale",
        str(setting.guidance_scale),
    ]
    return command + (["--compile"] if compiled else []) + extra


def worker_env(rehearse: bool) -> dict[str, str]:
    """The worker's environment: the repo's worker package importable, offline, one thread when
    rehearsing."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKER_DIR), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if rehearse:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@contextlib.contextmanager
def running_worker(
    command: list[str], env: dict[str, str], log_path: Path, deadline: Deadline, startup_limit_s: float
) -> Iterator[tuple[str, float]]:
    """Start the worker, wait for GET /ready == 200; yields (base url, seconds to ready). Raises
    WorkerStartError (the worker is stopped) when it exits, logs a start-up failure, or is not
    ready within `startup_limit_s` or the deadline."""
    port = int(command[command.index("--port") + 1])
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            failure = startup_failure(log_path.read_text(errors="replace"))
            if process.poll() is not None:
                reason = f": {failure}" if failure else ""
                raise WorkerStartError(
                    f"worker exited with status {process.returncode}{reason}", log_tail(log_path)
                )
            if failure:  # e.g. a device thread died: the worker lives on but never becomes ready
                raise WorkerStartError(f"worker failed at start-up: {failure}", log_tail(log_path))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            waited = time.perf_counter() - started
            if waited > startup_limit_s:
                raise WorkerStartError(
                    f"worker not ready after {waited:.0f} s (start-up limit {startup_limit_s:.0f} s)",
                    log_tail(log_path),
                )
            if deadline.remaining() <= 0:
                raise WorkerStartError(
                    f"worker not ready after {waited:.0f} s (time budget spent)", log_tail(log_path)
                )
            time.sleep(0.5)
        yield url, time.perf_counter() - started
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request_body(setting: ModelSetting, seed: int) -> dict[str, Any]:
    """One image of `setting` with `seed`, returned inline as base64 PNG."""
    return {
        "model": setting.name,
        "prompt": PROMPT,
        "size": setting.size,
        "response_format": "b64_json",
        "nvext": {
            "num_inference_steps": setting.steps,
            "guidance_scale": setting.guidance_scale,
            "seed": seed,
        },
    }


def generate(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST one generation; raises on any status but 200."""
    response = client.post(f"{url}/v1/images/generations", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    result: dict[str, Any] = response.json()
    return result


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative batch-size bucket counts from the worker's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    buckets = re.findall(r'diffusion_worker_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', text)
    return {le: float(count) for le, count in buckets}


def seconds_sums(text: str) -> dict[str, float]:
    """The worker's `*_seconds` histogram sums in a /metrics text, over all their labels."""
    sums: dict[str, float] = {}
    for name, value in re.findall(r"^diffusion_worker_(\w+)_seconds_sum(?:\{[^}]*\})? (\S+)$", text, re.M):
        sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def where_time_went(
    latencies: list[float], before: dict[str, float], after: dict[str, float]
) -> dict[str, float]:
    """Mean seconds per single-stream request: in the pipeline call, encoding the PNG (both from
    the worker's own histograms), and the rest (HTTP, JSON and base64, queueing, hand-offs)."""
    requests = len(latencies)
    mean = sum(latencies) / requests
    pipeline = (after.get("generation", 0.0) - before.get("generation", 0.0)) / requests
    encode = (after.get("encode", 0.0) - before.get("encode", 0.0)) / requests
    return {
        "mean_s_per_image": round(mean, 4),
        "pipeline_call_s": round(pipeline, 4),
        "encode_s": round(encode, 4),
        "other_s": round(mean - pipeline - encode, 4),
    }


def batch_sizes_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Batches per bucket between two cumulative snapshots."""
    result: dict[str, int] = {}
    previous = 0.0
    for le, count in after.items():
        cumulative = count - before.get(le, 0.0)
        if cumulative - previous:
            result[f"<={le}"] = int(cumulative - previous)
        previous = cumulative
    return result


def concurrent_round(
    client: httpx.Client, url: str, setting: ModelSetting, seeds: range
) -> tuple[float, dict[str, int]]:
    """One request per seed from CONCURRENCY client threads; returns (wall seconds, batch sizes)."""
    before = batch_histogram(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda seed: generate(client, url, request_body(setting, seed)), seeds))
    wall = time.perf_counter() - started
    return wall, batch_sizes_between(before, batch_histogram(url))


def measure_worker(
    client: httpx.Client, url: str, setting: ModelSetting, deadline: Deadline
) -> tuple[dict[str, Any], np.ndarray]:
    """Reference image, then seconds per image at concurrency 1 and images/s at concurrency 8."""
    record: dict[str, Any] = {}
    started = time.perf_counter()
    body = generate(client, url, request_body(setting, REFERENCE_SEED))
    record["first_request_s"] = round(time.perf_counter() - started, 2)
    image = decode_b64_png(body["data"][0]["b64_json"])
    record.update(image_stats(image))
    latencies: list[float] = []
    sums_before = seconds_sums(httpx.get(f"{url}/metrics", timeout=30).text)
    for seed in range(1, setting.runs + 1):
        if latencies and not deadline.allows(2 * max(latencies)):
            record["stopped_early"] = "time budget"
            break
        started = time.perf_counter()
        generate(client, url, request_body(setting, seed))
        latencies.append(time.perf_counter() - started)
    record["single_stream"] = {
        "s_per_image": summary(latencies),
        "where_time_went": where_time_went(
            latencies, sums_before, seconds_sums(httpx.get(f"{url}/metrics", timeout=30).text)
        ),
    }
    estimate = statistics.median(latencies) * (CONCURRENCY + setting.concurrent_requests)
    if not deadline.allows(estimate):
        record["concurrency_8"] = {"skipped": f"time budget (needs about {estimate:.0f} s)"}
        return record, image
    try:
        warm_wall, warm_batches = concurrent_round(client, url, setting, range(100, 100 + CONCURRENCY))
        requests = range(1000, 1000 + setting.concurrent_requests)
        wall, batches = concurrent_round(client, url, setting, requests)
    except (RuntimeError, httpx.HTTPError) as exc:  # e.g. out of memory at batch 8: keep the rest
        record["concurrency_8"] = {"error": f"{type(exc).__name__}: {exc}"}
        return record, image
    record["concurrency_8"] = {
        "requests": setting.concurrent_requests,
        "wall_s": round(wall, 3),
        "images_per_s": round(setting.concurrent_requests / wall, 4),
        "batch_sizes": batches,
        "warm_up": {"requests": CONCURRENCY, "wall_s": round(warm_wall, 3), "batch_sizes": warm_batches},
    }
    return record, image


def run_worker(
    directory: Path,
    setting: ModelSetting,
    device: str,
    compiled: bool,
    context: BenchContext,
    startup_limit_s: float,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Serve the model in a subprocess and measure it over HTTP; a worker that cannot start (an
    unknown flag, a failure in its log, no readiness within `startup_limit_s`) gives a record with
    `skipped` or `error` and the end of its log."""
    port = free_port()
    command = worker_command(directory, setting, device, port, compiled, context.worker_args)
    log_path = context.log_dir / f"worker-{setting.name}-{'compiled' if compiled else 'eager'}.log"
    record: dict[str, Any] = {
        "command": shlex.join(command[1:]),
        "log": str(log_path),
        "startup_limit_s": round(startup_limit_s),
    }
    env = worker_env(context.rehearse)
    try:
        with running_worker(command, env, log_path, context.deadline, startup_limit_s) as (url, ready_s):
            record["startup_s"] = round(ready_s, 2)
            timeout = httpx.Timeout(max(30.0, min(context.deadline.remaining(), 900.0)))
            limits = httpx.Limits(max_connections=CONCURRENCY)
            with httpx.Client(timeout=timeout, limits=limits) as client:
                measured, image = measure_worker(client, url, setting, context.deadline)
    except WorkerStartError as exc:
        unknown = [line for line in exc.log_tail if "unrecognized arguments" in line]
        key = "skipped" if unknown else "error"
        return {**record, key: unknown[0] if unknown else str(exc), "log_tail": exc.log_tail}, None
    return {**record, **measured}, image


# --- one model, all phases -----------------------------------------------------------------------


@dataclass
class BenchContext:
    """What every phase of one invocation shares."""

    device: str
    rehearse: bool
    rehearse_compile: bool
    worker_args: list[str]
    tolerance: float
    deadline: Deadline
    models_dir: Path
    log_dir: Path
    out_path: Path
    result: dict[str, Any]

    def save(self) -> None:
        """Write the result file as it stands (atomically: a reader never sees half a file)."""
        self.result["elapsed_s"] = round(self.deadline.elapsed(), 1)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.result, indent=2) + "\n")
        partial.replace(self.out_path)


def phase_order(mode: str) -> tuple[str, str]:
    """The sides of one mode in the order they run: eager raw first (its image and times feed the
    worker's phase); compiled worker first, the product's path, in case time runs out."""
    return ("raw", "worker") if mode == "eager" else ("worker", "raw")


def compile_estimate(phases: dict[str, Any], prior_s: float) -> float:
    """Seconds one compile of the denoiser takes: what the worker's compiled start-up took over its
    eager one, per graph, once measured; `prior_s` before."""
    compiled = phases.get("worker_compiled", {}).get("startup_s")
    eager = phases.get("worker_eager", {}).get("startup_s")
    if compiled is None or eager is None:
        return prior_s
    return max((float(compiled) - float(eager)) / WORKER_COMPILE_GRAPHS, 1.0)


def phase_estimate(phases: dict[str, Any], side: str, compiled: bool, compile_s: float) -> float:
    """Rough seconds a phase needs, from the phases already run and `compile_s`, the estimated
    seconds of one compile (with COMPILE_MARGIN on top: a compiled phase that cannot end must not
    start). The raw loop compiles one graph, the worker WORKER_COMPILE_GRAPHS."""
    raw_eager = float(phases.get("raw_eager", {}).get("elapsed_s", 0.0))
    if not compiled:
        return raw_eager if side == "worker" else 0.0
    if side == "raw":
        return raw_eager + COMPILE_MARGIN * compile_s
    worker_eager = float(phases.get("worker_eager", {}).get("elapsed_s", 0.0))
    return worker_eager + COMPILE_MARGIN * WORKER_COMPILE_GRAPHS * compile_s


def startup_limit(phases: dict[str, Any], compiled: bool, compile_s: float) -> float:
    """Seconds a worker may take to become ready before it is given up on: EAGER_STARTUP_LIMIT_S
    plus twice the raw load time, and for --compile a generous multiple of its graphs' compile
    time on top."""
    limit = EAGER_STARTUP_LIMIT_S + 2 * float(phases.get("raw_eager", {}).get("load_s", 0.0))
    if compiled:
        limit += STARTUP_COMPILE_FACTOR * WORKER_COMPILE_GRAPHS * compile_s
    return limit


def run_phase(
    context: BenchContext,
    record: dict[str, Any],
    key: str,
    estimate_s: float,
    body: Callable[[], tuple[dict[str, Any], np.ndarray | None]],
) -> np.ndarray | None:
    """Run one phase into `record["phases"][key]`, timing it; a failure is recorded, not raised,
    and the result file is rewritten either way. Returns the phase's reference image."""
    phases = record["phases"]
    if not context.deadline.allows(estimate_s):
        left = context.deadline.remaining()
        phases[key] = {"skipped": f"time budget: {left:.0f} s left, needs about {estimate_s:.0f} s"}
        context.save()
        return None
    label = f"{record['settings']['model']}: {key}"
    print(f"[{context.deadline.elapsed():6.0f} s] {label}", flush=True)
    started = time.perf_counter()
    image: np.ndarray | None = None
    try:
        phases[key], image = body()
    except Exception as exc:  # one broken phase must not lose the others' results
        phases[key] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc().splitlines()[-12:],
        }
    if "error" in phases[key]:
        release_memory(context.device)  # out of the except block: the traceback's frames are gone
    phases[key]["elapsed_s"] = round(time.perf_counter() - started, 2)
    context.save()
    # The numbers also go to stdout, for a run whose result file does not come back.
    shown = {k: v for k, v in phases[key].items() if k not in ("command", "log", "traceback")}
    print(f"[{context.deadline.elapsed():6.0f} s] {label} {json.dumps(shown)[:900]}", flush=True)
    return image


def ratios(phases: dict[str, Any], mode: str) -> dict[str, Any]:
    """Worker vs raw for one mode: latency at concurrency 1, throughput at 8 vs raw sequential."""
    raw = phases.get(f"raw_{mode}", {})
    worker = phases.get(f"worker_{mode}", {})
    found: dict[str, Any] = {}
    raw_s = raw.get("s_per_image", {}).get("median")
    worker_s = worker.get("single_stream", {}).get("s_per_image", {}).get("median")
    worker_c8 = worker.get("concurrency_8", {}).get("images_per_s")
    if raw_s and worker_s:
        found["worker_over_raw_s_per_image_single_stream"] = round(worker_s / raw_s, 4)
    if raw_s and worker_c8:
        found["worker_c8_images_per_s_over_raw_sequential"] = round(worker_c8 * raw_s, 4)
    if found and mode == "compiled":
        found["note"] = COMPILED_RATIO_NOTE
    return found


def compile_speedups(phases: dict[str, Any]) -> dict[str, float]:
    """Eager seconds per image over compiled, for raw and for the worker at concurrency 1."""
    found: dict[str, float] = {}
    for side, path in (("raw", ("s_per_image",)), ("worker", ("single_stream", "s_per_image"))):
        values = []
        for mode in MODES:
            entry: Any = phases.get(f"{side}_{mode}", {})
            for step in path:
                entry = entry.get(step, {})
            values.append(entry.get("median"))
        if all(values):
            found[side] = round(values[0] / values[1], 4)
    return found


def check_correctness(
    images: dict[str, np.ndarray | None], phases: dict[str, Any], tolerance: float
) -> dict[str, Any]:
    """Architecture-exact models, finite raw outputs, and the worker's reference-seed image equal
    to the raw one, per mode. `passed` is False if a gating check failed, None (not known) if none
    failed but the worker's eager image was not compared, True otherwise."""
    checks: dict[str, Any] = {}
    not_checked: list[str] = []
    if "params_match_reference" in phases.get("build", {}):
        checks["params_match_reference"] = {"passed": phases["build"]["params_match_reference"]}
    for mode in MODES:
        if f"raw_{mode}" not in phases:
            continue  # mode not asked for
        raw, worker = images.get(f"raw_{mode}"), images.get(f"worker_{mode}")
        if "finite" in phases[f"raw_{mode}"]:
            checks[f"raw_{mode}_finite"] = {"passed": phases[f"raw_{mode}"]["finite"]}
        if raw is not None and worker is not None:
            checks[f"worker_{mode}_vs_raw_{mode}"] = compare_images(raw, worker, tolerance)
        else:
            not_checked.append(f"worker_{mode}_vs_raw_{mode}")
    eager, compiled = images.get("raw_eager"), images.get("raw_compiled")
    if eager is not None and compiled is not None:
        checks["raw_compiled_vs_raw_eager"] = {
            **compare_images(eager, compiled, tolerance),
            "informational": "compiled kernels may round differently",
        }
    if "worker_compiled_vs_raw_compiled" in checks:
        # The worker compiles with a dynamic batch dimension (it batches requests), the raw loop a
        # static batch: two different graphs, whose kernels may round differently over 30 steps.
        checks["worker_compiled_vs_raw_compiled"]["informational"] = (
            "the worker's compiled graph is dynamic in the batch size, the raw loop's static"
        )
    gating = [c["passed"] for c in checks.values() if "informational" not in c]
    passed: bool | None = all(gating)
    if passed and "worker_eager_vs_raw_eager" not in checks:
        passed = None  # the check the headline is about never ran: not a pass
    checks["passed"] = passed
    checks["not_checked"] = not_checked  # a phase was skipped or failed: see its record
    return checks


def png_encode_cost(image: np.ndarray, repeats: int = 5) -> dict[str, Any]:
    """Median ms to make a PNG of `image` on this machine's CPU: Pillow on one thread, and the
    worker's encoder at its default thread count. The worker's is on the path of every
    single-stream request (the raw loop makes no file), so it explains part of the overhead."""
    from diffusion_worker.encoding import ImageEncoder, default_encode_threads

    picture = Image.fromarray(image)
    encoder = ImageEncoder(default_encode_threads())

    def median_ms(encode: Callable[[], Any]) -> float:
        encode()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            encode()
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1000, 2)

    try:
        return {
            "pillow_ms": median_ms(lambda: picture.save(io.BytesIO(), format="PNG")),
            "worker_ms": median_ms(lambda: encoder.encode([picture], "png")),
            "worker_threads": encoder.threads,
        }
    finally:
        encoder.close()


def bench_model(
    name: str,
    setting: ModelSetting,
    configs: dict[str, Any],
    params: dict[str, int] | None,
    modes: list[str],
    context: BenchContext,
) -> None:
    """Build, then the raw and worker phases for each mode, into `context.result["models"][name]`."""
    record: dict[str, Any] = {
        "settings": {
            "model": name,
            "size": setting.size,
            "steps": setting.steps,
            "guidance_scale": setting.guidance_scale,
            "dtype": setting.dtype,
            "prompt": PROMPT,
            "reference_seed": REFERENCE_SEED,
            "runs": setting.runs,
            "concurrency": CONCURRENCY,
            "max_batch_size": MAX_BATCH_SIZE,
            "concurrent_requests": setting.concurrent_requests,
        },
        "phases": {},
    }
    context.result["models"][name] = record
    directory = context.models_dir / (f"rehearsal-{name}" if context.rehearse else name)
    run_phase(
        context,
        record,
        "build",
        0.0 if context.rehearse else BUILD_PRIOR_S[name],
        lambda: (build_and_save(name, configs, params, context.device, setting.dtype, directory), None),
    )
    if "error" in record["phases"]["build"]:
        return
    images: dict[str, np.ndarray | None] = {}
    for mode in modes:
        compiled = mode == "compiled"
        phases = record["phases"]
        for side in phase_order(mode):
            key = f"{side}_{mode}"
            if compiled and context.rehearse and not context.rehearse_compile:
                phases[key] = {"skipped": REHEARSAL_COMPILE_SKIPPED}
                continue
            compile_s = compile_estimate(phases, COMPILE_PRIOR_S[name])
            body: Callable[[], tuple[dict[str, Any], np.ndarray | None]]
            if side == "raw":
                body = functools.partial(
                    run_raw, directory, setting, context.device, compiled, context.deadline
                )
            else:
                limit = startup_limit(phases, compiled, compile_s)
                body = functools.partial(
                    run_worker, directory, setting, context.device, compiled, context, limit
                )
            estimate = phase_estimate(phases, side, compiled, compile_s)
            images[key] = run_phase(context, record, key, estimate, body)
        record["ratios"] = {m: ratios(phases, m) for m in MODES if f"raw_{m}" in phases}
        record["compile_speedup"] = compile_speedups(phases)
        record["correctness"] = check_correctness(images, phases, context.tolerance)
        context.save()
    reference = images.get("raw_eager")
    if reference is not None:
        record["png_encode"] = png_encode_cost(reference)
        context.save()


# --- machine and versions ------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of the packages the numbers depend on."""
    names = (
        "torch",
        "triton",
        "diffusers",
        "transformers",
        "tokenizers",
        "huggingface-hub",
        "safetensors",
        "accelerate",
        "fastapi",
        "uvicorn",
        "pydantic",
        "httpx",
        "numpy",
        "pillow",
    )
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def nvidia_smi() -> dict[str, str]:
    """Driver version, name and memory of GPU 0 from nvidia-smi (empty where it is missing)."""
    query = "driver_version,name,memory.total"
    try:
        output = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    first = output.strip().splitlines()[0] if output.strip() else ""
    return dict(zip(query.split(","), (v.strip() for v in first.split(",")), strict=False))


def memory_gib() -> float | None:
    """Total RAM, from /proc/meminfo (None where it cannot be read)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def machine(device: str) -> dict[str, Any]:
    """CPU, platform and (on CUDA) the card, its driver and CUDA versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    found: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "tmp_disk_free_gib": round(shutil.disk_usage(tempfile.gettempdir()).free / 2**30, 1),
        "memory_gib": memory_gib(),
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        smi = nvidia_smi()
        found.update(
            device_name=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            driver_version=smi.get("driver_version", "unknown"),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return found


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="all models, in sequence (the default)")
    which.add_argument("--model", action="append", choices=MODEL_NAMES, help="one model (repeatable)")
    parser.add_argument("--rehearse", action="store_true", help="CPU, shrunk models, 64x64, 2 steps")
    parser.add_argument(
        "--rehearse-compile", action="store_true", help="also compiled mode in the rehearsal (slow)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="result directory")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--log-dir", type=Path, help="worker logs (default: a temporary directory)")
    parser.add_argument("--config", type=Path, default=CONFIG_PATH)
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra `serve` flags, shell-split; write --worker-arg=--channels-last",
    )
    parser.add_argument("--runs", type=int, help="timed single-stream images (default: per model)")
    parser.add_argument("--concurrent-requests", type=int, help="timed requests at concurrency 8")
    parser.add_argument("--tolerance", type=float, default=2.0, help="max pixel difference, 0-255")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help="seconds from the start; phases that would end later are skipped (0: no limit)",
    )
    parser.add_argument(
        "--end-at",
        type=float,
        help="Unix time the run must end by (e.g. the device call's end); with --time-budget, "
        "whichever comes first",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or its rehearsal) and write the result file; returns the exit status."""
    started, now = time.monotonic(), time.time()  # importing torch and starting CUDA count too
    args = parse_args(argv)
    deadline = Deadline(budget_seconds(args.time_budget, args.end_at, now), started=started)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    if args.rehearse:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("error: no CUDA device; use --rehearse for the CPU rehearsal", file=sys.stderr)
        return 2
    device = "cpu" if args.rehearse else "cuda"
    models = args.model or list(MODEL_NAMES)
    reference = load_configs(args.config)
    configs = rehearsal_configs(reference["configs"]) if args.rehearse else reference["configs"]
    params = None if args.rehearse else reference["params"]
    today = dt.date.today()
    card = "cpu" if args.rehearse else card_slug(torch.cuda.get_device_name(0))
    context = BenchContext(
        device=device,
        rehearse=args.rehearse,
        rehearse_compile=args.rehearse_compile,
        worker_args=[part for arg in args.worker_arg for part in shlex.split(arg)],
        tolerance=args.tolerance,
        deadline=deadline,
        models_dir=args.models_dir,
        log_dir=args.log_dir or Path(tempfile.mkdtemp(prefix="bench-gpu-logs-")),
        out_path=args.out / result_filename(card, today, models, args.rehearse),
        result={
            "benchmark": "gpu",
            "rehearsal": args.rehearse,
            "date": today.isoformat(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(device),
            "versions": versions(),
            "options": {
                "models": models,
                "modes": args.modes,
                "worker_args": args.worker_arg,
                "tolerance": args.tolerance,
                "time_budget_s": None if deadline.budget_s is None else round(deadline.budget_s, 1),
                "raw_baseline": "DiffusionPipeline.from_pretrained(dir, dtype=...).to(device); "
                "pipe(prompt, generator=torch.Generator('cpu').manual_seed(seed)), one image per call",
                "weights": "random, architecture-exact (bench/fullsize_configs.json); tokenizers tiny, "
                "padded to full length",
                "inductor_cache": "shared by the raw and worker compiled phases; the worker's runs "
                "first, so the raw first call may find some of its kernels compiled",
            },
            "models": {},
        },
    )
    context.log_dir.mkdir(parents=True, exist_ok=True)
    for name in models:
        setting = GPU_SETTINGS[name]
        if args.rehearse:
            setting = rehearsal_setting(setting)
        setting = dataclasses.replace(
            setting,
            runs=args.runs or setting.runs,
            concurrent_requests=args.concurrent_requests or setting.concurrent_requests,
        )
        bench_model(name, setting, configs, params, args.modes, context)
    context.save()
    print(f"[{context.deadline.elapsed():6.0f} s] wrote {context.out_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
