"""Image encoding."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_worker.encoding import ImageEncoder, encode_image, usable_cpus
from diffusion_worker.png import encode_pngs


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


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoder_threads_give_the_same_bytes_in_order(fmt: str) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(4)]
    expected = [encode_image(image, fmt, 90) for image in images]
    encoder = ImageEncoder(3)
    try:
        assert encoder.encode(images, fmt, 90) == expected
    finally:
        encoder.close()
    assert ImageEncoder(1).encode(images, fmt, 90) == expected


def test_png_of_a_palette_image_goes_through_pillow() -> None:
    palette = sample().convert("P")
    decoded = Image.open(io.BytesIO(ImageEncoder(1).encode([palette], "png")[0]))
    assert decoded.mode == "P"
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(palette.convert("RGB")))


def test_png_of_rgb_uses_the_threaded_writer() -> None:
    assert encode_image(sample(), "png") == encode_pngs([np.asarray(sample())])[0]


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({}, None),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ],
)
def test_usable_cpus_follow_the_cgroup_cpu_limit(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (affinity if limit is None else min(affinity, limit))


def test_webp_at_compression_100_is_lossless_and_below_is_not() -> None:
    rng = np.random.default_rng(1)
    pixels = np.cumsum(rng.integers(0, 8, (32, 32, 3)), axis=1).astype(np.uint8)
    image = Image.fromarray(pixels)
    lossless = np.asarray(Image.open(io.BytesIO(encode_image(image, "webp", 100))).convert("RGB"))
    assert np.array_equal(lossless, pixels)
    lossy = np.asarray(Image.open(io.BytesIO(encode_image(image, "webp", 90))).convert("RGB"))
    assert not np.array_equal(lossy, pixels)
