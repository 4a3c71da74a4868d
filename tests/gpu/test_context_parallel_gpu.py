"""Context parallelism for real: two GPUs, NCCL, diffusers' attention split, on a shrunk FLUX.1-dev
(bench/gpu.py's rehearsal configs, built and saved with `save_pretrained`). Opt-in (`-m gpu`);
skipped on machines with fewer than two GPUs.

    .venv/bin/python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusion_worker.engine import GenerationBatch, load_engines
from diffusion_worker.settings import WorkerSettings
from support.bench_scripts import load_bench_script

pytestmark = pytest.mark.gpu


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bench = load_bench_script("gpu")
    configs = bench.rehearsal_configs(json.loads(bench.CONFIG_PATH.read_text())["configs"])
    directory = tmp_path_factory.mktemp("models") / "flux"
    bench.build_and_save("flux", configs, None, "cuda", "bfloat16", directory)
    return directory


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_two_ranks_make_the_image_one_gpu_makes(tiny_flux: Path, mode: str) -> None:
    batch = GenerationBatch(
        prompts=["a red circle", "a blue square"],
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=3.5,
        seeds=[1, 2],
    )
    (single,) = load_engines(WorkerSettings(model=str(tiny_flux), dtype="bfloat16"))
    expected = single.generate(batch)
    single.close()
    (parallel,) = load_engines(
        WorkerSettings(
            model=str(tiny_flux), dtype="bfloat16", context_parallel_size=2, context_parallel_mode=mode
        )
    )
    try:
        images = parallel.generate(batch)
    finally:
        parallel.close()
    for ours, reference in zip(images, expected, strict=True):
        difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
        assert difference.mean() < 2.0 and difference.max() <= 32, (difference.mean(), difference.max())
