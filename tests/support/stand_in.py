"""What stand-in engines (tests where only which batch runs, and when, matters; no pipeline)
describe themselves as."""

from __future__ import annotations

from diffusion_worker.engine import ModelInfo

STAND_IN_INFO = ModelInfo(
    pipeline_class="StandIn",
    default_size=(64, 64),
    default_steps=2,
    default_guidance_scale=7.5,
    supports_negative_prompt=True,
    supports_guidance_scale=True,
)
