"""diffusion_worker: serves a diffusers pipeline over the OpenAI images API."""

__version__ = "0.1.0"
