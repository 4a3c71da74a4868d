"""Load-time engine options on the tiny pipeline, loaded through `from_pretrained` as in serving."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffusion_worker.engine import GenerationBatch, ModelLoadError, load_engines
from diffusion_worker.pipeline_options import enable_vae_tiling
from diffusion_worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def batch(size: int) -> GenerationBatch:
    return GenerationBatch(
        prompts=["a red circle"],
        negative_prompts=None,
        width=size,
        height=size,
        num_inference_steps=2,
        guidance_scale=7.5,
        seeds=[7],
    )


def test_vae_tiling_decodes_only_images_larger_than_the_vae_sample_size_in_tiles(
    tiny_model_dir: Path,
) -> None:
    """The tiny VAE's sample size is 64 px: a 64 px image is decoded whole, a 128 px one in tiles.
    The real `tiled_decode` runs; it is only wrapped to count its calls."""
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir), vae_tiling=True))
    vae = engine.pipeline.vae
    assert vae.use_tiling
    calls: list[Any] = []
    real_tiled_decode = vae.tiled_decode

    def counting_tiled_decode(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape)
        return real_tiled_decode(*args, **kwargs)

    vae.tiled_decode = counting_tiled_decode
    (small,) = engine.generate(batch(64))
    assert calls == []
    (large,) = engine.generate(batch(128))
    assert len(calls) == 1
    assert large.size == (128, 128)
    assert np.isfinite(np.asarray(large, dtype=np.float32)).all() and small.size == (64, 64)


def test_without_vae_tiling_a_large_image_is_decoded_whole(tiny_model_dir: Path) -> None:
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    assert not engine.pipeline.vae.use_tiling
    (image,) = engine.generate(batch(128))
    assert image.size == (128, 128)


def test_vae_tiling_is_refused_for_a_pipeline_without_a_tiling_vae() -> None:
    """A stand-in object: no text-to-image diffusers pipeline without a VAE is at hand here."""
    with pytest.raises(ValueError, match="--vae-tiling: SimpleNamespace has no VAE"):
        enable_vae_tiling(types.SimpleNamespace(vae=None))


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_compile_builds_its_graphs_at_load_so_requests_at_the_default_size_compile_nothing(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--compile` with dynamo's "eager" backend: the real graph capture and recompilation rules,
    without inductor's code generation (which takes about 9 minutes for the tiny UNet on this CPU;
    the GPU benchmark, bench/gpu.py, runs the real backend). What is checked is the warm-up's
    promise: after load, a batch of another size and a call without guidance capture no new graph."""
    import torch
    from torch._dynamo.utils import counters

    from diffusion_worker import pipeline_options

    monkeypatch.setattr(pipeline_options, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    (plain,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    (compiled,) = load_engines(WorkerSettings(model=str(tiny_model_dir), compile=True, max_batch_size=4))
    assert compiled.pipeline.unet._compiled_call_impl is not None
    graphs_after_load = counters["stats"]["unique_graphs"]
    assert graphs_after_load >= 2

    three = GenerationBatch(
        prompts=["a red circle", "a blue square", "a cat"],
        negative_prompts=["green"] * 3,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7.5,
        seeds=[1, 2, 3],
    )
    unguided = GenerationBatch(
        prompts=["a red circle"],
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        seeds=[4],
    )
    compiled_images = compiled.generate(three) + compiled.generate(unguided)
    assert counters["stats"]["unique_graphs"] == graphs_after_load
    plain_images = plain.generate(three) + plain.generate(unguided)
    for ours, reference in zip(compiled_images, plain_images, strict=True):
        assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_compile_warm_up_leaves_no_batch_size_to_compile_for_a_model_run_without_guidance(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model without classifier-free guidance (FLUX; here the tiny UNet at guidance 1), with the
    --check-max-batch call first, as on a GPU: the warm-up's batches of 4 and 1 each compiled a
    graph of their own size, and the first request batch of 2 or 3 compiled a third (minutes, for
    FLUX at 1024 on an H100), as the GPU benchmark's review found. The "eager" backend, as above."""
    import torch
    from torch._dynamo.utils import counters

    from diffusion_worker import pipeline_options

    monkeypatch.setattr(pipeline_options, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    settings = WorkerSettings(
        model=str(tiny_model_dir),
        compile=True,
        max_batch_size=4,
        check_max_batch="on",
        default_guidance_scale=1.0,
        default_inference_steps=2,
    )
    (compiled,) = load_engines(settings)
    graphs_after_load = counters["stats"]["unique_graphs"]
    for count in (3, 2):
        compiled.generate(
            GenerationBatch(
                prompts=["a red circle"] * count,
                negative_prompts=None,
                width=64,
                height=64,
                num_inference_steps=2,
                guidance_scale=1.0,
                seeds=list(range(count)),
            )
        )
        assert counters["stats"]["unique_graphs"] == graphs_after_load, f"a batch of {count} compiled"


def test_compile_mode_is_passed_to_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in denoiser records the call: the mode reaches torch.compile, "default" as None."""
    from diffusion_worker import pipeline_options

    calls: list[dict[str, Any]] = []
    denoiser = types.SimpleNamespace(compile=lambda **kwargs: calls.append(kwargs))
    pipeline_options.compile_denoiser(types.SimpleNamespace(unet=denoiser), "max-autotune")
    pipeline_options.compile_denoiser(types.SimpleNamespace(transformer=denoiser), "default")
    assert calls == [{"backend": "inductor", "mode": "max-autotune"}, {"backend": "inductor", "mode": None}]


def test_channels_last_changes_the_memory_layout_not_the_image(tiny_model_dir: Path) -> None:
    import torch

    (plain,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    (nhwc,) = load_engines(WorkerSettings(model=str(tiny_model_dir), channels_last=True))
    for component in (nhwc.pipeline.unet, nhwc.pipeline.vae):
        conv = next(m for m in component.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
    (ours,), (reference,) = nhwc.generate(batch(64)), plain.generate(batch(64))
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_attention_backend_is_refused_for_a_unet_whose_attention_cannot_switch(
    tiny_model_dir: Path,
) -> None:
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel does not go through diffusers"):
        load_engines(WorkerSettings(model=str(tiny_model_dir), attention_backend="flash"))


def test_an_unknown_attention_backend_is_refused_with_the_known_names(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="'fastest' is not one of: flash, "):
        load_engines(WorkerSettings(model=str(tiny_model_dir), attention_backend="fastest"))
