"""Loads a diffusers pipeline onto a device and runs batches on it. Knows nothing of HTTP."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from diffusion_worker import pipeline_options
from diffusion_worker.device_thread import DeviceThread
from diffusion_worker.errors import APIError, invalid_param
from diffusion_worker.model_source import ModelSourceError, model_defaults, resolve_model
from diffusion_worker.previews import CleanLatentTap, PreviewPlan, decode_latents
from diffusion_worker.protocol import parse_size
from diffusion_worker.settings import WorkerSettings
from diffusion_worker.vae_decode import decode_one_at_a_time_when_out_of_memory

log = logging.getLogger(__name__)

FALLBACK_STEPS = 50
FALLBACK_GUIDANCE = 7.5
FALLBACK_SIZE = 512
WARM_UP_PROMPT = "warm-up"
WARM_UP_STEPS = 2


class ModelLoadError(Exception):
    """The model could not be loaded; the message is meant for the operator's logs."""


class GenerationCancelledError(Exception):
    """A pipeline call was stopped between denoising steps because nobody waits for its images."""


class DeviceOutOfMemoryError(Exception):
    """A pipeline call ran out of device memory; the memory it held has been released."""


class FlaggedImage:
    """Stands in `generate`'s result for an image the pipeline's safety checker flagged (diffusers
    has already blacked it out); serving refuses the request that asked for it."""


KeepGoing = Callable[[], bool]


@dataclass(frozen=True)
class GenerationBatch:
    """Images made by one pipeline call. Image i is seeded with seeds[i] on its own generator,
    so an image comes out the same whether it is made alone or in a batch."""

    prompts: list[str]
    negative_prompts: list[str] | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def compatibility_key(self) -> tuple[Any, ...]:
        """Batches with equal keys can share one pipeline call."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.negative_prompts is not None,
        )

    @property
    def memory_key(self) -> tuple[Any, ...]:
        """Batches with equal keys need the same device memory per image: the compatibility key
        without the step count, which changes the time a call takes, not its memory."""
        return (self.width, self.height, self.guidance_scale, self.negative_prompts is not None)


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs to know about the loaded pipeline to apply defaults and reject misuse."""

    pipeline_class: str
    default_size: tuple[int, int]
    default_steps: int
    default_guidance_scale: float
    supports_negative_prompt: bool
    supports_guidance_scale: bool
    supports_step_callback: bool = False
    # The most denoising steps the pipeline's scheduler can run; None when it sets no known limit.
    max_steps: int | None = None
    # The most images per call that fit in device memory at the default size (check_max_batch);
    # None when not checked.
    max_batch_size: int | None = None
    # The pipeline runs a safety checker on its output (diffusers' `safety_checker` component).
    has_safety_checker: bool = False
    # Width and height must be multiples of this (see `size_multiple`).
    size_multiple: int = 8
    # Ranks that split each image's tokens between them (--context-parallel-size); 1 without.
    context_parallel_size: int = 1

    def size_from(self, value: str, max_pixels: int) -> tuple[int, int]:
        """`WIDTHxHEIGHT` as this model can make it: within `max_pixels`, both sides multiples of
        `size_multiple`, and with image tokens the context-parallel ranks can split (a 400
        APIError naming `size` otherwise)."""
        size = parse_size(
            value, max_pixels=max_pixels, multiple=self.size_multiple, model=self.pipeline_class
        )
        self.check_splits(size, value)
        return size

    def check_splits(self, size: tuple[int, int], value: str) -> None:
        """Refuse a size whose image tokens the context-parallel ranks cannot share evenly.

        diffusers' context-parallel sharder asserts that each sequence it splits divides by the
        ranks; a size that does not failed on every rank, as a 500 counted against the device (three
        in a row took the worker out of rotation). A token is one `size_multiple` square of pixels.
        """
        ranks, multiple = self.context_parallel_size, self.size_multiple
        tokens = (size[0] // multiple) * (size[1] // multiple)
        if tokens % ranks:
            raise invalid_param(
                "size",
                f"`size` {value.strip()!r} makes {tokens} image tokens ({size[0]}/{multiple} x "
                f"{size[1]}/{multiple}), which {ranks} context-parallel ranks cannot split evenly: "
                f"(width/{multiple}) x (height/{multiple}) must be a multiple of {ranks}",
            )


class Engine(Protocol):
    """A pipeline on one device; `generate` is called from one thread at a time."""

    info: ModelInfo
    device: str

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        """Run one pipeline call; returns PIL images in batch order.

        `keep_going` is asked after each denoising step; False stops the call with
        GenerationCancelledError. `previews` asks for partial images of some rows after some steps.
        Both need a pipeline with step callbacks (`ModelInfo.supports_step_callback`).
        """
        ...

    def close(self) -> None:
        """Release the pipeline and its device memory."""
        ...


def select_devices(settings: WorkerSettings) -> list[str]:
    """One device per data-parallel rank: cuda:K..K+N-1 from --device cuda:K (cuda:0.. without an
    index) when CUDA is present, else N times cpu."""
    import torch

    base = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(base)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {base!r} is not a torch device (cuda, cuda:1, cpu): {exc}") from exc
    if device.type != "cuda":
        return [base] * settings.data_parallel_size
    available = torch.cuda.device_count()
    if available == 0 or (device.index is not None and device.index >= available):
        raise ModelLoadError(
            f"--device {base}: {available} CUDA devices visible (CUDA_VISIBLE_DEVICES, the pod's GPUs)"
        )
    if settings.data_parallel_size == 1:
        return [base]
    # Ranks start at --device's index: starting at cuda:0 whatever it said put them on GPUs the
    # operator meant for something else.
    first = device.index or 0
    last = first + settings.data_parallel_size - 1
    if last >= available:
        given = f"--device {base} with " if device.index is not None else ""
        raise ModelLoadError(
            f"{given}--data-parallel-size {settings.data_parallel_size} needs cuda:{first}..cuda:{last}; "
            f"{available} CUDA devices visible (CUDA_VISIBLE_DEVICES, the pod's GPUs)"
        )
    return [f"cuda:{index}" for index in range(first, last + 1)]


def resolve_dtype(dtype: str, device: str) -> Any:
    """`--dtype` -> torch dtype; `auto` is bf16 (or fp16 on GPUs without bf16) on CUDA, fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def apply_pipeline_options(pipeline: Any, settings: WorkerSettings) -> None:
    """The start-up options that change how the pipeline runs (see `pipeline_options`)."""
    try:
        if settings.vae_tiling:
            pipeline_options.enable_vae_tiling(pipeline)
        if settings.channels_last:
            pipeline_options.use_channels_last(pipeline)
        if settings.attention_backend:
            pipeline_options.set_attention_backend(pipeline, settings.attention_backend)
        if settings.compile:
            pipeline_options.compile_denoiser(pipeline, settings.compile_mode)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


class DiffusersEngine:
    """A diffusers text-to-image pipeline on one device."""

    def __init__(self, pipeline: Any, device: str, defaults: Mapping[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.device = device
        self.info = with_model_defaults(describe_pipeline(pipeline), defaults or {})
        self.thread = DeviceThread(f"pipeline-{device}", device)  # every call, warm-up and requests

    @classmethod
    def load(cls, settings: WorkerSettings, device: str) -> DiffusersEngine:
        """Load --model through `from_pretrained` onto `device` (`prepare_engines` then checks the
        batch size and warms up)."""
        import diffusers

        try:
            location = resolve_model(settings.model, settings.cache_dir)
            defaults = model_defaults(location)
        except ModelSourceError as exc:
            raise ModelLoadError(str(exc)) from exc
        except OSError as exc:  # the cache folder missing, read-only, full
            raise ModelLoadError(
                f"could not prepare {settings.model!r} under --cache-dir {settings.cache_dir}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        pipeline_class: Any = diffusers.DiffusionPipeline
        if settings.pipeline:
            pipeline_class = getattr(diffusers, settings.pipeline, None)
            if not (
                inspect.isclass(pipeline_class) and issubclass(pipeline_class, diffusers.DiffusionPipeline)
            ):
                raise ModelLoadError(f"--pipeline {settings.pipeline!r} is not a diffusers pipeline class")
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(settings.dtype, device)}
        if location.from_hub:
            kwargs["cache_dir"] = str(settings.cache_dir / "hub")
            if settings.revision:
                kwargs["revision"] = settings.revision
        if not settings.safety_checker:
            kwargs["safety_checker"] = None  # a component given as None is not loaded
        try:
            pipeline = pipeline_class.from_pretrained(location.name_or_path, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"could not load model {settings.model!r}: {type(exc).__name__}: {exc}"
            ) from exc
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        engine = cls(pipeline, device, defaults)
        engine.check_makes_images(settings)  # eager: before a compiled denoiser sees its first shape
        apply_pipeline_options(pipeline, settings)
        decode_one_at_a_time_when_out_of_memory(pipeline)
        log.info("loaded %s (%s) on %s", settings.model, type(pipeline).__name__, device)
        return engine

    def check_makes_images(self, settings: WorkerSettings) -> None:
        """Start an image as a request with only a prompt would, and stop after its first step.

        A pipeline that cannot make an image from a prompt alone (an image-to-image or inpainting
        class, `--pipeline StableDiffusionXLPipeline` on an SD 1.5 model: its missing components
        are set to None) loads without complaint; every request then failed, and the scheduler,
        counting the failures against the device, took the engine out of rotation, so the pod
        restarted into the same loop with a diagnosis that blamed the GPU. A ModelLoadError here
        ends start-up with one line instead. The model's default steps, as requests run them (a
        scheduler may need more than one or two), stopped after the first: the text encoders, the
        denoiser and the scheduler have all run. A --default-size the model cannot make stops
        start-up here too."""
        width, height = default_size(self.info, settings)
        batch = GenerationBatch(
            prompts=["a test image"],
            negative_prompts=None,
            width=width,
            height=height,
            num_inference_steps=settings.default_inference_steps or self.info.default_steps,
            guidance_scale=self.info.default_guidance_scale,
            seeds=[0],
        )
        try:
            self.generate(batch, keep_going=lambda: False)
        except GenerationCancelledError:
            return  # after its first denoising step, as asked
        except DeviceOutOfMemoryError as exc:
            raise ModelLoadError(f"{exc} at start-up: too little free memory for one image") from exc
        except Exception as exc:
            raise ModelLoadError(
                f"{type(self.pipeline).__name__} loaded {settings.model!r} but cannot make an image from a "
                f"prompt ({type(exc).__name__}: {exc}); this worker serves text-to-image pipelines: check "
                "--pipeline and the model's model_index.json"
            ) from exc

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        """Run one pipeline call with one CPU generator per image (same noise on any device), on
        the engine's own thread whoever calls (DeviceThread)."""
        return self.thread.call(self._generate, batch, keep_going, previews)

    def _generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None, previews: PreviewPlan | None
    ) -> list[Any]:
        import torch

        kwargs: dict[str, Any] = {
            "prompt": batch.prompts,
            "num_inference_steps": batch.num_inference_steps,
            "height": batch.height,
            "width": batch.width,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in batch.seeds],
            "output_type": "pil",
        }
        if self.info.supports_guidance_scale:
            kwargs["guidance_scale"] = batch.guidance_scale
        if batch.negative_prompts is not None:
            kwargs["negative_prompt"] = batch.negative_prompts
        tap = CleanLatentTap(self.pipeline.scheduler) if previews and previews.rows_at_step else None
        if self.info.supports_step_callback and (keep_going is not None or tap is not None):
            previews_failed = False

            def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                nonlocal previews_failed
                if keep_going is not None and not keep_going():
                    raise GenerationCancelledError(f"stopped after step {step + 1}")
                if (
                    tap is not None
                    and previews is not None
                    and tap.latest is not None
                    and not previews_failed
                ):
                    rows = previews.rows_at_step.get(step + 1)
                    if rows:
                        try:
                            images = decode_latents(
                                self.pipeline, tap.latest[rows], batch.width, batch.height
                            )
                        except Exception as exc:
                            # A preview is extra work the API lets go missing (fewer partial images
                            # than asked): its failure (the extra VAE decode out of memory, say) must
                            # not fail, split or retry the batch, nor count against the device.
                            previews_failed = True
                            log.warning("previews stopped for this batch: decoding one failed: %s", exc)
                            return tensors
                        for row, image in zip(rows, images, strict=True):
                            previews.sink(row, step + 1, image)
                return tensors

            kwargs["callback_on_step_end"] = on_step_end
        try:
            with torch.inference_mode(), tap or contextlib.nullcontext():
                output = self.pipeline(**kwargs)
        except torch.OutOfMemoryError as exc:
            images = f"{len(batch)} {batch.width}x{batch.height} image{'s' if len(batch) > 1 else ''}"
            failure = f"{self.device} ran out of memory making {images}"
            log.warning("%s: %s", failure, str(exc).splitlines()[0] if str(exc) else "no detail")
        else:
            flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(output.images)
            return [
                FlaggedImage() if is_flagged else image
                for image, is_flagged in zip(output.images, flagged, strict=True)
            ]
        # Out of the except block the traceback (and every activation its frames hold) is gone, so
        # the cache can hand that memory back before the next batch.
        self.release_memory()
        raise DeviceOutOfMemoryError(failure)

    def release_memory(self) -> None:
        """Collect garbage and return cached blocks to the device (after an out-of-memory error)."""
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the pipeline; frees GPU memory."""
        self.thread.stop()
        self.pipeline = None
        self.release_memory()


def describe_pipeline(pipeline: Any) -> ModelInfo:
    """Defaults and capabilities read from the pipeline's call signature and configs."""
    parameters = inspect.signature(pipeline.__call__).parameters

    def default_of(name: str, fallback: Any) -> Any:
        parameter = parameters.get(name)
        if parameter is None or parameter.default in (inspect.Parameter.empty, None):
            return fallback
        return parameter.default

    return ModelInfo(
        pipeline_class=type(pipeline).__name__,
        default_size=native_size(pipeline),
        default_steps=int(default_of("num_inference_steps", FALLBACK_STEPS)),
        default_guidance_scale=float(default_of("guidance_scale", FALLBACK_GUIDANCE)),
        supports_negative_prompt="negative_prompt" in parameters,
        supports_guidance_scale="guidance_scale" in parameters,
        supports_step_callback="callback_on_step_end" in parameters,
        max_steps=scheduler_step_limit(getattr(pipeline, "scheduler", None)),
        has_safety_checker=getattr(pipeline, "safety_checker", None) is not None,
        size_multiple=size_multiple(pipeline),
    )


def size_multiple(pipeline: Any) -> int:
    """What width and height must be multiples of: 8, or more where the pipeline packs latents
    (its image processor's VAE factor: 16 for Flux and Qwen-Image, 32 for Sana) or its transformer
    patches them (VAE factor times patch size: 16 for SD3 and PixArt). Flux resizes any other size
    with only a warning, so the image would not be the size asked for; SD3 raises mid-request."""
    multiples = [8]
    processor_config = getattr(getattr(pipeline, "image_processor", None), "config", None)
    packed = getattr(processor_config, "vae_scale_factor", None)
    if isinstance(packed, int) and packed > 0:
        multiples.append(packed)
    patch = getattr(getattr(getattr(pipeline, "transformer", None), "config", None), "patch_size", None)
    scale = getattr(pipeline, "vae_scale_factor", None)
    if isinstance(patch, int) and isinstance(scale, int) and patch > 0 and scale > 0:
        multiples.append(scale * patch)
    return math.lcm(*multiples)


def default_size(info: ModelInfo, settings: WorkerSettings) -> tuple[int, int]:
    """--default-size, checked against the model (ModelLoadError), else the model's native size,
    which --max-pixels binds too (`native_size_within`)."""
    if not settings.default_size:
        return native_size_within(info, settings.max_pixels)
    try:
        return info.size_from(settings.default_size, settings.max_pixels)
    except APIError as exc:
        raise ModelLoadError(f"--default-size: {exc.message}") from exc


def native_size_within(info: ModelInfo, max_pixels: int) -> tuple[int, int]:
    """The model's native size, when it has at most `max_pixels` pixels; ModelLoadError otherwise.

    Above it, every request without `size` was made at a size no request could ask for by name.
    Start-up stops rather than shrinking it unasked: a model drawn below its native size draws
    worse, and the operator who lowered --max-pixels should choose the size (the error names one).
    """
    width, height = info.default_size
    if width * height <= max_pixels:
        return width, height
    fit = largest_size_within(info.default_size, max_pixels, info.size_multiple)
    raise ModelLoadError(
        f"the model's native size {width}x{height} ({width * height} pixels) is above --max-pixels "
        f"{max_pixels}; set --default-size to a size within it (e.g. {fit[0]}x{fit[1]}, the same shape) "
        "or raise --max-pixels"
    )


def largest_size_within(size: tuple[int, int], max_pixels: int, multiple: int) -> tuple[int, int]:
    """`size` scaled down to at most `max_pixels` pixels, both sides rounded down to `multiple`."""
    scale = math.sqrt(max_pixels / (size[0] * size[1]))
    width, height = (max(multiple, math.floor(side * scale / multiple) * multiple) for side in size)
    return width, height


def scheduler_step_limit(scheduler: Any) -> int | None:
    """The most steps `scheduler` can run, found by setting its timesteps on a copy; None if unknown.

    A scheduler that indexes its noise table by timestep (DDIM, PNDM, DPM-Solver, ...) is limited
    by the table's length: DDIM and PNDM with `steps_offset=1` asked for all 1000 steps produce
    timestep 1000 and fail with an IndexError halfway through the call. Flow-matching schedulers
    have no such table and no such limit.
    """
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if not isinstance(train_steps, int) or getattr(scheduler, "alphas_cumprod", None) is None:
        return None
    probe = copy.deepcopy(scheduler)
    for count in range(train_steps, 0, -1):
        try:
            probe.set_timesteps(count)
        except ValueError:  # more steps than this scheduler allows
            continue
        if float(probe.timesteps.min()) >= 0 and float(probe.timesteps.max()) < train_steps:
            return count
    return None


def with_model_defaults(info: ModelInfo, defaults: Mapping[str, Any]) -> ModelInfo:
    """`info` with the steps and guidance the model directory asks for (its worker_defaults.json)."""
    changes: dict[str, Any] = {}
    if "num_inference_steps" in defaults:
        changes["default_steps"] = int(defaults["num_inference_steps"])
    if "guidance_scale" in defaults:
        changes["default_guidance_scale"] = float(defaults["guidance_scale"])
    return dataclasses.replace(info, **changes)


def native_size(pipeline: Any) -> tuple[int, int]:
    """The resolution the model was trained at: sample size of the denoiser times the VAE factor."""
    scale = int(getattr(pipeline, "vae_scale_factor", 8) or 8)
    sample = getattr(pipeline, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    if not isinstance(sample, int):
        return (FALLBACK_SIZE, FALLBACK_SIZE)
    side = sample * scale
    return (side, side)


def start_up_batch(engine: Engine, settings: WorkerSettings, size: int, guidance: float) -> GenerationBatch:
    """`size` images at the default size, WARM_UP_STEPS steps: what start-up runs before serving."""
    width, height = default_size(engine.info, settings)
    return GenerationBatch(
        prompts=[WARM_UP_PROMPT] * size,
        negative_prompts=None,
        width=width,
        height=height,
        num_inference_steps=WARM_UP_STEPS,
        guidance_scale=guidance,
        seeds=list(range(size)),
    )


def default_guidance(engine: Engine, settings: WorkerSettings) -> float:
    guidance = settings.default_guidance_scale
    return engine.info.default_guidance_scale if guidance is None else guidance


def batch_limit(engine: Engine, settings: WorkerSettings) -> int:
    """The most images per call: --max-batch-size, or less where check_max_batch found less fits."""
    return min(settings.max_batch_size, engine.info.max_batch_size or settings.max_batch_size)


def warm_up(engine: Engine, settings: WorkerSettings) -> None:
    """Run the calls that make torch.compile build its graphs, before the port opens, so no
    request pays for them: batches of one, two and the most images, with and without
    classifier-free guidance, at the default size. A batch dimension of 1 is always compiled as a
    constant, and one seen at a single other size (the --check-max-batch call, a model without
    guidance) too: the batch of two is what makes it dynamic, covering every size from 2 up. A
    request at another size compiles once more on first use."""
    import time

    guidances = [default_guidance(engine, settings)]
    if engine.info.supports_guidance_scale and guidances[0] > 1:
        guidances.append(1.0)
    started = time.perf_counter()
    for guidance in guidances:
        for size in sorted({1, min(2, batch_limit(engine, settings)), batch_limit(engine, settings)}):
            engine.generate(start_up_batch(engine, settings, size, guidance))
    log.info("warmed up the compiled %s in %.1fs", engine.device, time.perf_counter() - started)


def fit_max_batch(engine: Engine, settings: WorkerSettings) -> int:
    """The largest batch, from --max-batch-size halving down, that makes a start-up batch at the
    default size and guidance without running out of device memory (ModelLoadError if one image
    does not fit)."""
    guidance = default_guidance(engine, settings)
    size = settings.max_batch_size
    while True:
        work = start_up_batch(engine, settings, size, guidance)
        try:
            engine.generate(work)
        except DeviceOutOfMemoryError as exc:
            if size == 1:
                raise ModelLoadError(
                    f"one {work.width}x{work.height} image does not fit in {engine.device}'s memory ({exc}); "
                    "try --vae-tiling, a smaller --default-size or dtype, or a larger GPU"
                ) from exc
            size //= 2
            continue
        if size < settings.max_batch_size:
            log.warning(
                "--max-batch-size %d does not fit in %s's memory at %dx%d; batches capped at %d",
                settings.max_batch_size,
                engine.device,
                work.width,
                work.height,
                size,
            )
        return size


def prepare_engines(engines: Sequence[DiffusersEngine], settings: WorkerSettings) -> None:
    """Before the port opens: check the batch size fits in device memory (check_max_batch), then
    the compile warm-up. The data-parallel devices hold the same model: one check serves all."""
    check = settings.check_max_batch
    if check == "on" or (check == "auto" and engines[0].device.startswith("cuda")):
        fitted = fit_max_batch(engines[0], settings)
        for engine in engines:
            engine.info = dataclasses.replace(engine.info, max_batch_size=fitted)
    if settings.compile:
        for engine in engines:
            warm_up(engine, settings)


def load_engines(settings: WorkerSettings) -> list[Engine]:
    """One engine per data-parallel rank, or one engine over all context-parallel ranks."""
    if settings.context_parallel_size > 1:  # alone: WorkerSettings refuses data parallel with it
        from diffusion_worker import context_parallel

        return [context_parallel.start(settings)]
    engines = [DiffusersEngine.load(settings, device) for device in select_devices(settings)]
    prepare_engines(engines, settings)
    return list(engines)
