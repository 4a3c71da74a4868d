"""The VAE decode fallback's refusals, on a real (small) AutoencoderKL; the fallback itself is
tested on the whole worker in tests/integration/worker/test_out_of_memory.py. The out-of-memory
error is raised by a stand-in for the VAE's inner decode: no CPU runs out of CUDA memory."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL

from diffusion_worker.vae_decode import decode_one_at_a_time_when_out_of_memory


def small_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16, layers_per_block=1
    )


def running_out(vae: AutoencoderKL, above: int) -> list[int]:
    """Make the VAE's inner decode run out of memory for more than `above` images; returns the
    batch sizes it was asked to decode."""
    real, calls = vae._decode, []

    def inner(latents: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(latents.shape[0])
        if latents.shape[0] > above:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(latents, *args, **kwargs)

    vae._decode = inner
    return calls


def test_a_batch_is_decoded_again_image_by_image_and_slicing_stays_on() -> None:
    vae = small_vae()
    latents = torch.randn(3, 4, 8, 8)
    with torch.inference_mode():
        expected = vae.decode(latents).sample
    assert decode_one_at_a_time_when_out_of_memory(SimpleNamespace(vae=vae))
    calls = running_out(vae, above=1)
    with torch.inference_mode():
        decoded = vae.decode(latents, return_dict=False)[0]
    assert calls == [3, 1, 1, 1] and vae.use_slicing
    assert torch.allclose(decoded, expected, atol=1e-5)


def test_one_image_that_does_not_fit_still_raises() -> None:
    vae = small_vae()
    decode_one_at_a_time_when_out_of_memory(SimpleNamespace(vae=vae))
    calls = running_out(vae, above=0)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        vae.decode(torch.randn(1, 4, 8, 8))
    assert calls == [1] and not vae.use_slicing


def test_a_sliced_decode_that_runs_out_raises() -> None:
    vae = small_vae()
    decode_one_at_a_time_when_out_of_memory(SimpleNamespace(vae=vae))
    vae.enable_slicing()
    calls = running_out(vae, above=0)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        vae.decode(torch.randn(2, 4, 8, 8))
    assert calls == [1], "sliced already: no second attempt"


@pytest.mark.parametrize(
    "pipeline", [SimpleNamespace(), SimpleNamespace(vae=None), SimpleNamespace(vae=torch.nn.Identity())]
)
def test_pipelines_without_a_slicing_vae_are_left_alone(pipeline: Any) -> None:
    before = getattr(getattr(pipeline, "vae", None), "decode", None)
    assert not decode_one_at_a_time_when_out_of_memory(pipeline)
    assert getattr(getattr(pipeline, "vae", None), "decode", None) == before
