"""A batch whose VAE decode runs out of device memory is decoded again, one image at a time.

The decode is the last step of a pipeline call: when it runs out of memory, every denoising step of
the batch has already run, and without this the scheduler would redo the whole batch, in halves,
from the first step. It is also where large batches often run out: the decoder works at full image
resolution, the denoiser at 1/8 of it. So the VAE's `decode` is wrapped: a batch that runs out turns
on diffusers' `enable_slicing` (decode image by image) for good and is decoded again within the same
pipeline call; the images are those of a batched decode (up to rounding). A VAE without slicing, a
single image that does not fit, or a decode already sliced raises as before.
"""

from __future__ import annotations

import functools
import gc
import logging
from typing import Any

log = logging.getLogger(__name__)


def decode_one_at_a_time_when_out_of_memory(pipeline: Any) -> bool:
    """Wrap the pipeline's VAE decode as the module docstring says; False when its VAE (if any)
    cannot decode image by image."""
    vae = getattr(pipeline, "vae", None)
    if vae is None or not callable(getattr(vae, "enable_slicing", None)) or not hasattr(vae, "use_slicing"):
        return False
    batched_decode = vae.decode

    @functools.wraps(batched_decode)
    def decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        try:
            return batched_decode(latents, *args, **kwargs)
        except torch.OutOfMemoryError:
            if vae.use_slicing or latents.shape[0] < 2:
                raise
        # Out of the except block, nothing references the failed decode's activations any more.
        gc.collect()
        if latents.is_cuda:
            torch.cuda.empty_cache()
        vae.enable_slicing()
        log.warning(
            "the VAE ran out of device memory decoding %d images at once; decoding one image at a time "
            "from now on (the denoising steps are kept)",
            latents.shape[0],
        )
        return batched_decode(latents, *args, **kwargs)

    vae.decode = decode
    return True
