"""`make train-demo-model`'s script, run for a few steps: seeded, and its output is a pipeline that
loads through `DiffusionPipeline.from_pretrained` and draws (issue 8).

The full recipe takes 18 min on an idle 2-core Xeon, so here each stage runs 3 steps with
batches of 4, through the same code as `make train-demo-model`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from diffusion_worker.model_source import WORKER_DEFAULTS_FILE
from diffusion_worker.shapes import model, train

pytestmark = pytest.mark.integration

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def short_run(output: Path, seed: int, *options: str) -> Path:
    arguments = ["--output", str(output), "--seed", str(seed), "--threads", "1", "--eval-seeds", "0"]
    arguments += ["--vae-steps", "3", "--vae-batch", "4", "--steps", "3", "--batch", "4", *options]
    assert train.main(arguments) == 0
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    import torch

    threads = torch.get_num_threads()  # train.main sets its own; later tests keep theirs
    base = tmp_path_factory.mktemp("training")
    yield {
        "seed 0": short_run(base / "a", 0),
        "seed 0 again": short_run(base / "b", 0),
        "seed 1": short_run(base / "c", 1),
        # The other text wiring than the default one: pooled prompt on/off, one text layer or none.
        "other wiring": short_run(
            base / "d",
            0,
            "--no-pooled-prompt" if model.POOLED_PROMPT else "--pooled-prompt",
            "--text-layers",
            "0" if model.TEXT_LAYERS else "1",
        ),
    }
    torch.set_num_threads(threads)


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(runs: dict[str, Path]) -> None:
    for name in WEIGHT_FILES:
        first, again, other = (
            (runs[run] / name).read_bytes() for run in ("seed 0", "seed 0 again", "seed 1")
        )
        assert first == again, name
        assert first != other, name


def test_the_output_records_the_run_and_the_workers_defaults(runs: dict[str, Path]) -> None:
    output = runs["seed 1"]
    record = json.loads((output / "training.json").read_text())
    assert record["command"].startswith("python -m diffusion_worker.shapes.train --output ")
    assert record["seed"] == 1
    assert (record["vae_steps"], record["unet_steps"]) == (3, 3)
    assert record["metrics"] is None
    assert np.isfinite(record["final_loss_mean_last_100"])
    assert record["versions"]["torch"]
    defaults = json.loads((output / WORKER_DEFAULTS_FILE).read_text())
    assert defaults == {"num_inference_steps": model.DEFAULT_STEPS, "guidance_scale": model.DEFAULT_GUIDANCE}
    assert not list(output.parent.glob(".c-*")), "the staging directory was left behind"


@pytest.mark.parametrize("run", ["seed 0", "other wiring"])
def test_the_output_loads_as_a_diffusers_pipeline_and_draws(runs: dict[str, Path], run: str) -> None:
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(runs[run])
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline, StableDiffusionPipeline)
    pooled = model.POOLED_PROMPT if run == "seed 0" else not model.POOLED_PROMPT
    assert (pipeline.unet.config.addition_embed_type == "text") is pooled
    layers = model.TEXT_LAYERS if run == "seed 0" else int(not model.TEXT_LAYERS)
    assert pipeline.text_encoder.config.num_hidden_layers == layers
    generator = torch.Generator().manual_seed(0)
    image = pipeline("a red circle", num_inference_steps=2, generator=generator, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--eval-seeds", "-1"], "--eval-seeds must not be negative"),
    ],
)
def test_nonsense_settings_are_refused_before_training(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        train.parse_args(arguments)
    assert refused.value.code == 2
    assert message in capsys.readouterr().err
