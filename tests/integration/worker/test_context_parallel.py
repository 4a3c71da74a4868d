"""Context parallelism's rank fan-out on the CPU, with real processes and a real gloo group.

The attention split itself (diffusers' `enable_parallelism`) needs GPUs; here the split is
replaced by `support.rank_probe`, which all-reduces over the group in every denoiser call (see its
docstring). Everything else is the worker's own code: child processes spawned, the group joined,
each batch broadcast, images returned by rank 0, the ranks stopped on close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusion_worker import context_parallel
from diffusion_worker.engine import GenerationBatch, ModelLoadError, load_engines
from diffusion_worker.settings import WorkerSettings
from support import rank_probe

pytestmark = pytest.mark.integration


def batch(prompts: list[str], seeds: list[int], steps: int) -> GenerationBatch:
    return GenerationBatch(
        prompts=prompts,
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seeds=seeds,
    )


@pytest.mark.timeout(600)
def test_every_rank_makes_every_batch_and_rank_0_returns_the_images(tiny_model_dir: Path) -> None:
    settings = WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2)
    (single,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    first, second = batch(["a red circle"], [3], 2), batch(["a cat", "a dog", "a cow"], [4, 5, 6], 3)
    rank_probe.SUMS.clear()
    engine = context_parallel.start(
        settings, device_for_rank=lambda rank: "cpu", parallelize=rank_probe.all_reduce_each_denoiser_call
    )
    try:
        assert engine.info.supports_step_callback is False
        images = engine.generate(first) + engine.generate(second)
    finally:
        engine.close()
    assert all(not process.is_alive() for process in engine.processes)
    assert all(process.exitcode == 0 for process in engine.processes)
    # 2 + 3 denoiser calls; in each, both ranks had the same batch (2 and 6 rows with guidance).
    assert [(round(rows, 6), round(step, 6)) for rows, step in rank_probe.SUMS] == [(2.0, 2.0)] * 5
    expected = single.generate(first) + single.generate(second)
    for ours, reference in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(reference))


def test_a_unet_model_is_refused_before_any_rank_starts(tiny_model_dir: Path) -> None:
    """The real split's checks, on the tiny SD pipeline (a UNet: no context-parallel plan)."""
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    settings = WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2)
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel does not support context parallelism"):
        context_parallel.check_supported(engine.pipeline, settings)


def test_context_parallel_needs_one_gpu_per_rank() -> None:
    with pytest.raises(
        ModelLoadError, match="--context-parallel-size 2 needs 2 GPUs, one per rank; 0 visible"
    ):
        load_engines(WorkerSettings(model="builtin:tiny-sd", context_parallel_size=2))


def test_context_and_data_parallel_together_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="cannot both be above 1"):
        load_engines(WorkerSettings(model="builtin:tiny-sd", context_parallel_size=2, data_parallel_size=2))
