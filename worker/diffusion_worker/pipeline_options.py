"""Start-up options that change how a loaded pipeline runs, not what it draws.

Each is applied once, right after the pipeline is on its device, and refuses with a `ValueError`
(the engine turns it into a start-up error) where the pipeline cannot honour it, so a flag is
never silently ignored.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DENOISERS = ("transformer", "unet")
CONV_COMPONENTS = ("unet", "vae")
# torch.compile backend of --compile; tests swap in "eager" (graph capture without code generation,
# which on a CPU takes minutes even for a tiny UNet).
COMPILE_BACKEND = "inductor"


def denoiser_of(pipeline: Any) -> Any:
    """The module the pipeline calls once per step (its transformer or UNet)."""
    for name in DENOISERS:
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipeline).__name__} has no transformer or unet")


def enable_vae_tiling(pipeline: Any) -> None:
    """`--vae-tiling`: the pipeline's VAE decodes large latents in tiles (diffusers' enable_tiling)."""
    vae = getattr(pipeline, "vae", None)
    if vae is None or not callable(getattr(vae, "enable_tiling", None)):
        raise ValueError(f"--vae-tiling: {type(pipeline).__name__} has no VAE that can decode in tiles")
    vae.enable_tiling()


def use_channels_last(pipeline: Any) -> list[str]:
    """`--channels-last`: convolutional components (UNet, VAE) store activations NHWC, the layout
    tensor cores read without a transpose. Returns the components changed."""
    import torch

    changed = []
    for name in CONV_COMPONENTS:
        module = getattr(pipeline, name, None)
        if module is not None:
            module.to(memory_format=torch.channels_last)
            changed.append(name)
    if not changed:
        raise ValueError(f"--channels-last: {type(pipeline).__name__} has no UNet or VAE")
    return changed


def set_attention_backend(pipeline: Any, backend: str) -> None:
    """`--attention-backend`: the denoiser's attention runs on the named diffusers backend (flash,
    _native_cudnn, sage, ...). Only denoisers whose attention dispatches through diffusers'
    backends can switch; UNet pipelines (SD 1.5, SDXL) always use PyTorch's SDPA, which picks its
    own kernel, so the flag is refused for them rather than ignored."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [member.value for member in AttentionBackendName]
    if backend not in known:
        raise ValueError(f"--attention-backend {backend!r} is not one of: {', '.join(known)}")
    denoiser = denoiser_of(pipeline)
    if not any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules()):
        raise ValueError(
            f"--attention-backend: the attention of {type(denoiser).__name__} does not go through "
            "diffusers' attention backends (it always uses PyTorch's scaled_dot_product_attention); "
            "leave the flag out for this model"
        )
    try:
        denoiser.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise ValueError(f"--attention-backend {backend}: {exc}") from exc


def compile_denoiser(pipeline: Any, mode: str) -> None:
    """`--compile`: torch.compile the denoiser in place (the module keeps its type and config, so
    the pipeline's own code still works). Compilation happens on the first calls: see `warm_up`."""
    denoiser = denoiser_of(pipeline)
    denoiser.compile(backend=COMPILE_BACKEND, mode=None if mode == "default" else mode)
    log.info("compiling %s (mode %s) on its first calls", type(denoiser).__name__, mode)
