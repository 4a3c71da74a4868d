"""A real CUDA out-of-memory error: the tiny pipeline on a GPU whose memory this process may use is
capped between what a batch of 2 and a batch of 4 need. Opt-in (`-m gpu`); skipped without CUDA.

The CPU tests raise `torch.cuda.OutOfMemoryError` themselves (tests/integration/worker/
test_out_of_memory.py); this one lets the allocator raise it, checks that the scheduler's split
(or, where the VAE decode is what runs out, decoding image by image) makes the same images as an
unconstrained batch, and that the memory of the failed call is returned to the device.

    .venv/bin/python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffusion_worker.engine import Engine, GenerationBatch, load_engines
from diffusion_worker.metrics import WorkerMetrics
from diffusion_worker.scheduler import Scheduler
from diffusion_worker.settings import WorkerSettings

pytestmark = pytest.mark.gpu

SIZE = 512


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def batch(images: int) -> GenerationBatch:
    return GenerationBatch(
        prompts=["a red circle"] * images,
        negative_prompts=None,
        width=SIZE,
        height=SIZE,
        num_inference_steps=2,
        guidance_scale=7.5,
        seeds=list(range(images)),
    )


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 (which rounds their inputs to 10 mantissa bits);
    the previous settings are restored after."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def peak_reserved(engine: Engine, images: int, base: int) -> int:
    """Bytes the allocator reserved, above `base`, to make a batch of `images`."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine.generate(batch(images))
    return int(torch.cuda.max_memory_reserved()) - base


def through_scheduler(engine: Engine, metrics: WorkerMetrics, images: int) -> list[Any]:
    scheduler = Scheduler([engine], max_queue=images, max_batch_size=images, metrics=metrics)
    scheduler.start()
    try:
        return asyncio.run(scheduler.generate(batch(images), "gpu-oom"))
    finally:
        scheduler.close()


@pytest.mark.skipif(not cuda(), reason="needs CUDA")
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("exact_fp32")
def test_a_batch_too_big_for_the_card_is_split_and_its_memory_returns(tiny_model_dir: Path) -> None:
    import torch

    # The split batches must make the batch of 4's images within 2 levels, but each batch size picks
    # its own kernels, whose rounding in bf16 (dtype auto on CUDA) or TF32 alone moves pixels by more
    # (bf16 vs fp32: up to 6 levels on the CPU). So fp32, and no TF32 (the exact_fp32 fixture).
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir), device="cuda", dtype="float32"))
    try:
        expected = [np.asarray(image, dtype=np.int16) for image in engine.generate(batch(4))]
        torch.cuda.empty_cache()
        base = int(torch.cuda.memory_reserved())
        allocated_before = int(torch.cuda.memory_allocated())
        one, four = peak_reserved(engine, 1, base), peak_reserved(engine, 4, base)
        assert four > 2 * one > 0, f"peak memory does not grow with the batch: 1 -> {one}, 4 -> {four}"
        # Linear in the batch, a + b*n: the mean of the two fits a batch of 2, not one of 4.
        limit = base + (one + four) // 2
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(limit / total)
        metrics = WorkerMetrics()
        metrics.watch_devices([engine.device])
        try:
            images = through_scheduler(engine, metrics, 4)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        memory = {
            kind: metrics.registry.get_sample_value(
                "diffusion_worker_device_memory_bytes", {"device": engine.device, "kind": kind}
            )
            for kind in ("allocated", "reserved", "peak_allocated")
        }
        assert 0 < (memory["allocated"] or 0) <= (memory["reserved"] or 0), memory
        assert (memory["peak_allocated"] or 0) >= (memory["allocated"] or 0), memory
        splits = metrics.registry.get_sample_value("diffusion_worker_out_of_memory_splits_total") or 0
        sliced = bool(engine.pipeline.vae.use_slicing)
        assert splits >= 1 or sliced, "the batch of 4 fitted: nothing was tested"
        for made, reference in zip(images, expected, strict=True):
            assert np.abs(np.asarray(made, dtype=np.int16) - reference).max() <= 2
        torch.cuda.empty_cache()
        assert int(torch.cuda.memory_allocated()) <= allocated_before + 1024 * 1024, "memory was not returned"
    finally:
        engine.close()
