"""The threaded PNG writer: files any decoder reads back to the same pixels, whatever the threads."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_worker.png import STRIP_BYTES, adler32_combine, encode_pngs, filter_rows


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, after checking the signature and each chunk's CRC."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    found, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        found.append((kind, data))
        position += 12 + length
    return found


def natural_image(size: int, seed: int = 0) -> np.ndarray:
    """Smooth RGB with fine texture (a random walk along both axes), so compression sizes are
    nearer a photograph's than random pixels are."""
    steps = np.random.default_rng(seed).integers(-2, 3, (size, size, 3))
    field = steps.cumsum(axis=0).cumsum(axis=1).astype(np.float64)
    field -= field.min(axis=(0, 1))
    return (field / field.max(axis=(0, 1)) * 255).round().astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    channels=st.sampled_from([0, 1, 2, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
    smooth=st.booleans(),
)
def test_pixels_decode_back_exactly(height: int, width: int, channels: int, seed: int, smooth: bool) -> None:
    shape = (height, width) if channels == 0 else (height, width, channels)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    if smooth:  # gradients make every filter, not only None, the cheapest somewhere
        pixels = np.cumsum(pixels // 16, axis=0, dtype=np.uint8)
    [png] = encode_pngs([pixels])
    image = Image.open(io.BytesIO(png))
    assert image.mode == {0: "L", 1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    assert np.array_equal(np.asarray(image).reshape(pixels.shape), pixels)


def test_stream_is_one_valid_zlib_stream() -> None:
    pixels = natural_image(400)
    [png] = encode_pngs([pixels])
    kinds = [kind for kind, _ in chunks(png)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    header = dict(chunks(png))[b"IHDR"]
    assert struct.unpack(">IIBBBBB", header) == (400, 400, 8, 2, 0, 0, 0)
    # zlib checks the Adler-32 at the end, which the strips' combined checksums must have made right.
    stream = dict(chunks(png))[b"IDAT"]
    rows = np.frombuffer(zlib.decompress(stream), dtype=np.uint8).reshape(400, 1 + 400 * 3)
    assert set(rows[:, 0]) <= {0, 1, 2, 3, 4}
    # Every strip but the last ends with a sync flush, whose empty stored block is these 4 bytes.
    strip_rows = -(-STRIP_BYTES // (400 * 3))
    strips = -(-400 // strip_rows)
    assert strips >= 3
    assert stream.count(b"\x00\x00\xff\xff") >= strips - 1


def reference_filters(row: list[int], above: list[int], bpp: int) -> list[list[int]]:
    """The five PNG filters of one row, byte by byte as the PNG specification writes them."""

    def paeth(a: int, b: int, c: int) -> int:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else b if pb <= pc else c

    left = [row[i - bpp] if i >= bpp else 0 for i in range(len(row))]
    upper_left = [above[i - bpp] if i >= bpp else 0 for i in range(len(row))]
    return [
        [x % 256 for x in row],
        [(x - a) % 256 for x, a in zip(row, left, strict=True)],
        [(x - b) % 256 for x, b in zip(row, above, strict=True)],
        [(x - (a + b) // 2) % 256 for x, a, b in zip(row, left, above, strict=True)],
        [(x - paeth(a, b, c)) % 256 for x, a, b, c in zip(row, left, above, upper_left, strict=True)],
    ]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_each_row_takes_its_cheapest_filter(channels: int) -> None:
    rng = np.random.default_rng(channels)
    gradient = np.add.outer(np.arange(24), np.arange(9))[:, :, np.newaxis] * 7
    pixels = ((gradient + rng.integers(0, 3, (24, 9, channels))) % 256).astype(np.uint8)
    pixels[::5] = rng.integers(0, 256, pixels[::5].shape, dtype=np.uint8)  # rows where None wins
    rows = pixels.reshape(24, -1)
    filtered = filter_rows(rows, np.vstack([rows[:1] * 0, rows[:-1]]), channels)
    chosen = set()
    for index, row in enumerate(rows.tolist()):
        above = rows[index - 1].tolist() if index else [0] * len(row)
        options = reference_filters(row, above, channels)
        costs = [sum(min(v, 256 - v) for v in option) for option in options]
        kind = int(filtered[index, 0])
        assert costs[kind] == min(costs), (index, costs)
        assert filtered[index, 1:].tolist() == options[kind]
        chosen.add(kind)
    assert len(chosen) >= 3, chosen


def test_bytes_do_not_depend_on_threads() -> None:
    images = [natural_image(300, seed) for seed in range(3)] + [np.zeros((5, 7, 4), dtype=np.uint8)]
    alone = encode_pngs(images)
    with ThreadPoolExecutor(3) as pool:
        assert encode_pngs(images, executor=pool) == alone
    assert alone == [encode_pngs([image])[0] for image in images]


def test_size_is_near_pillows() -> None:
    """ISA-L's fast deflate makes files about 10% larger than Pillow's zlib on smooth images (the
    price of its speed); a level or strip size that costs more than that fails here (level 0: 31%)."""
    pixels = natural_image(512)
    [ours] = encode_pngs([pixels])
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, format="PNG")
    assert len(ours) < 1.15 * len(pillow.getvalue())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(ours))), pixels)


def test_rows_wider_than_a_strip_make_one_row_strips() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (3, STRIP_BYTES, 3), dtype=np.uint8)
    [png] = encode_pngs([pixels])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=300), second=st.binary(max_size=300), repeat=st.integers(1, 400))
def test_adler32_combine_equals_the_checksum_of_the_joined_bytes(
    first: bytes, second: bytes, repeat: int
) -> None:
    second = second * repeat  # lengths past the modulus 65521 as well
    combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "C in 1-4"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "at least one pixel"),
        (np.zeros((4,), dtype=np.uint8), "HxW"),
    ],
)
def test_unsupported_arrays_are_refused(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_pngs([pixels])


def test_level_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="0-3, got 4"):
        encode_pngs([np.zeros((2, 2), dtype=np.uint8)], level=4)
