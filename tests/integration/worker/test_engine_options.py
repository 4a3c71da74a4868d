"""Load-time engine options on the tiny pipeline, loaded through `from_pretrained` as in serving."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffusion_worker.engine import GenerationBatch, ModelLoadError, enable_vae_tiling, load_engines
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
    with pytest.raises(ModelLoadError, match="--vae-tiling: SimpleNamespace has no VAE"):
        enable_vae_tiling(types.SimpleNamespace(vae=None))
