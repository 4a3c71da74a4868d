"""The most steps a scheduler can run, probed on real diffusers schedulers (nothing mocked)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)

from diffusion_worker.engine import scheduler_step_limit

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def run_all_steps(scheduler: Any, count: int) -> None:
    """Set `count` timesteps and step through them all, as a pipeline call does."""
    scheduler.set_timesteps(count)
    sample = torch.zeros(1, 1, 2, 2)
    for timestep in scheduler.timesteps:
        sample = scheduler.step(torch.zeros_like(sample), timestep, sample).prev_sample


@pytest.mark.parametrize(
    ("scheduler", "limit"),
    [
        (DDIMScheduler(**SD_BETAS, steps_offset=1), 999),
        (PNDMScheduler(**SD_BETAS, steps_offset=1, skip_prk_steps=True), 999),
        (DDIMScheduler(**SD_BETAS, steps_offset=0), 1000),
        (DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1), 1000),
        (EulerDiscreteScheduler(**SD_BETAS, steps_offset=1), 1000),
    ],
    ids=["ddim-offset-1", "pndm-offset-1", "ddim-offset-0", "dpm-solver", "euler"],
)
def test_the_limit_is_the_most_steps_the_scheduler_runs_through(scheduler: Any, limit: int) -> None:
    assert scheduler_step_limit(scheduler) == limit
    run_all_steps(scheduler, limit)
    if limit < scheduler.config.num_train_timesteps:
        with pytest.raises(IndexError):
            run_all_steps(scheduler, limit + 1)


def test_probing_leaves_the_scheduler_as_it_was() -> None:
    scheduler = DDIMScheduler(**SD_BETAS, steps_offset=1)
    scheduler.set_timesteps(30)
    before = scheduler.timesteps.clone()
    scheduler_step_limit(scheduler)
    assert torch.equal(scheduler.timesteps, before)


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(), None, object()])
def test_schedulers_without_a_noise_table_have_no_known_limit(scheduler: Any) -> None:
    assert scheduler_step_limit(scheduler) is None
