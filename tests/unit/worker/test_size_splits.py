"""With context parallelism, a size whose image tokens the ranks cannot share is a 400 naming `size`.

diffusers' sharder asserts that the ranks divide each sequence they split; such a size failed on
every rank as a 500 that counted against the device."""

from __future__ import annotations

import dataclasses

import pytest

from diffusion_worker.errors import APIError
from support.stand_in import STAND_IN_INFO

FLUX_LIKE = dataclasses.replace(STAND_IN_INFO, pipeline_class="FluxPipeline", size_multiple=16)


def test_a_size_two_ranks_cannot_split_is_a_400_naming_the_rule() -> None:
    info = dataclasses.replace(FLUX_LIKE, context_parallel_size=2)
    with pytest.raises(APIError) as caught:
        info.size_from("48x48", 2048 * 2048)
    error = caught.value
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", "size")
    assert "makes 9 image tokens (48/16 x 48/16)" in error.message
    assert "(width/16) x (height/16) must be a multiple of 2" in error.message


@pytest.mark.parametrize(("ranks", "size"), [(2, "48x64"), (3, "48x48"), (4, "1024x1024")])
def test_a_size_the_ranks_can_split_passes(ranks: int, size: str) -> None:
    info = dataclasses.replace(FLUX_LIKE, context_parallel_size=ranks)
    width, height = (int(side) for side in size.split("x"))
    assert info.size_from(size, 2048 * 2048) == (width, height)


def test_without_context_parallel_any_size_of_the_multiple_passes() -> None:
    assert FLUX_LIKE.size_from("48x48", 2048 * 2048) == (48, 48)
