"""Image encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffusion_worker.encoding import encode_image


def sample() -> Image.Image:
    image = Image.new("RGB", (16, 8))
    image.putdata([(x * 16, y * 32, 128) for y in range(8) for x in range(16)])
    return image


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_back_with_the_same_size(fmt: str, pil_format: str) -> None:
    decoded = Image.open(io.BytesIO(encode_image(sample(), fmt, 80)))
    assert decoded.format == pil_format and decoded.size == (16, 8)


def test_png_is_deterministic_and_lossless() -> None:
    first, second = encode_image(sample(), "png"), encode_image(sample(), "png")
    assert first == second
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), np.asarray(sample()))


def test_compression_changes_jpeg_size() -> None:
    assert len(encode_image(sample(), "jpeg", 10)) < len(encode_image(sample(), "jpeg", 100))


def test_unknown_format_raises() -> None:
    with pytest.raises(ValueError, match="gif"):
        encode_image(sample(), "gif")
