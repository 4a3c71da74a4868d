"""PNG writer that spreads an image over several threads.

Pillow writes a PNG on one thread with zlib: 40-45 ms for 512x512 and 140-160 ms for 1024x1024 on a
2-core Xeon (bench/encoding.py), up to 5% of a GPU generation at those sizes and the largest cost
the worker adds to a request. Here the image is cut into horizontal strips that are filtered
(numpy) and deflated (ISA-L, many times faster than zlib at nearly its sizes) on their own, both of
which release the GIL, and joined into one zlib stream the way pigz joins its blocks: every strip
but the last ends with a sync flush (byte-aligned, no end-of-stream bit), and the strips' Adler-32
checksums combine into the stream's. A strip holds at least 128 KiB of rows, four times deflate's
32 KiB window, so restarting the compressor per strip costs about 1% of the file, and each thread's
work is long enough that the GIL, held between numpy calls, is rarely in the way. The strips depend
only on the image's size, so the same pixels give the same bytes however many threads ran.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Channels -> PNG colour type: grey, grey + alpha, RGB, RGBA.
COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
STRIP_BYTES = 1 << 17
# ISA-L's levels run 0-3; 2 is its default.
DEFAULT_LEVEL = isal_zlib.ISAL_DEFAULT_COMPRESSION
MAX_LEVEL = isal_zlib.ISAL_BEST_COMPRESSION
# zlib header: deflate with a 32 KiB window; (0x78 << 8 | 0x9C) is a multiple of 31, as RFC 1950 asks.
ZLIB_HEADER = b"\x78\x9c"
ADLER_BASE = 65521


@dataclass(frozen=True)
class _Strip:
    """One deflated strip: its compressed bytes and the Adler-32 and length of its filtered bytes."""

    body: bytes
    adler: int
    length: int


def filter_rows(rows: np.ndarray, previous: np.ndarray, bytes_per_pixel: int) -> np.ndarray:
    """PNG-filter each row (uint8, one image row per line; `previous` holds the row above each) with
    the filter of None, Sub, Up, Average and Paeth that gives the smallest cost; each output row
    starts with the filter's type byte."""
    left = np.zeros_like(rows)
    left[:, bytes_per_pixel:] = rows[:, :-bytes_per_pixel]
    upper_left = np.zeros_like(previous)
    upper_left[:, bytes_per_pixel:] = previous[:, :-bytes_per_pixel]
    a, b, c = left.astype(np.int16), previous.astype(np.int16), upper_left.astype(np.int16)
    # Paeth picks whichever of left, up and upper-left is nearest to left + up - upper-left. The
    # choice is made with masks times differences, not np.where, which on noisy images (choices
    # changing at random) is 25x slower.
    b_minus_c, a_minus_c = b - c, a - c
    distance_c = np.abs(b_minus_c + a_minus_c)
    distance_a, distance_b = np.abs(b_minus_c), np.abs(a_minus_c)
    take_left = (distance_a <= distance_b) & (distance_a <= distance_c)
    take_up = (distance_b <= distance_c) & ~take_left
    # uint8 arithmetic wraps modulo 256, as the PNG filters are defined.
    paeth = upper_left + take_left.view(np.uint8) * (left - upper_left)
    paeth += take_up.view(np.uint8) * (previous - upper_left)
    average = ((a + b) >> 1).astype(np.uint8)
    candidates = np.empty((5, *rows.shape), dtype=np.uint8)
    candidates[0] = rows
    np.subtract(rows, left, out=candidates[1])
    np.subtract(rows, previous, out=candidates[2])
    np.subtract(rows, average, out=candidates[3])
    np.subtract(rows, paeth, out=candidates[4])
    # A filtered row's cost is the sum of its bytes' magnitudes read as signed numbers ("minimum sum
    # of absolute differences", libpng's heuristic). abs(-128) stays -128 in int8, which read back
    # as uint8 is 128: the right magnitude.
    cost = np.abs(candidates.view(np.int8)).view(np.uint8).sum(axis=2, dtype=np.uint32)
    choice = cost.argmin(axis=0)
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = choice
    filtered[:, 1:] = candidates[choice, np.arange(rows.shape[0])]
    return filtered


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings joined, from the checksum of each (zlib's adler32_combine,
    which Python's zlib module does not expose)."""
    remainder = second_length % ADLER_BASE
    low = ((first & 0xFFFF) + (second & 0xFFFF) + ADLER_BASE - 1) % ADLER_BASE
    high = (remainder * (first & 0xFFFF)) % ADLER_BASE
    high = (high + (first >> 16) + (second >> 16) + ADLER_BASE - remainder) % ADLER_BASE
    return low | (high << 16)


def _deflate_strip(
    rows: np.ndarray, previous: np.ndarray, bytes_per_pixel: int, level: int, last: bool
) -> _Strip:
    filtered = filter_rows(rows, previous, bytes_per_pixel).tobytes()
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    body = compressor.compress(filtered)
    body += compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)
    return _Strip(body, isal_zlib.adler32(filtered), len(filtered))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(kind + data))


def _as_rows(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """The image as (height, width * channels) uint8 rows, and its channel count."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPES:
        raise ValueError(f"PNG pixels must be HxW or HxWxC with C in 1-4, got shape {pixels.shape}")
    height, width, channels = pixels.shape
    if height == 0 or width == 0:
        raise ValueError(f"PNG needs at least one pixel, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels).reshape(height, width * channels), channels


def _strip_bounds(height: int, row_bytes: int) -> list[tuple[int, int]]:
    """First and past-the-last row of each strip: whole rows, at least STRIP_BYTES each but the last."""
    strip_rows = max(1, -(-STRIP_BYTES // row_bytes))
    return [(start, min(start + strip_rows, height)) for start in range(0, height, strip_rows)]


def encode_pngs(
    images: Sequence[np.ndarray], level: int = DEFAULT_LEVEL, executor: Executor | None = None
) -> list[bytes]:
    """PNG files (8 bits per channel) of uint8 arrays HxW or HxWxC (C: 1 grey, 2 grey + alpha,
    3 RGB, 4 RGBA) at ISA-L deflate `level` 0-3. The strips of every image run on `executor` at once;
    without one, in turn on this thread."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"PNG compression level must be 0-{MAX_LEVEL}, got {level}")
    prepared = [_as_rows(pixels) for pixels in images]
    layout = [_strip_bounds(*rows.shape) for rows, _ in prepared]
    tasks = []
    for (rows, channels), bounds in zip(prepared, layout, strict=True):
        for start, end in bounds:
            # The row above each row; the first row's is all zeros.
            above = rows[start - 1 : end - 1] if start else np.vstack([rows[:1] * 0, rows[: end - 1]])
            tasks.append((rows[start:end], above, channels, level, end == rows.shape[0]))
    if executor is None:
        strips = [_deflate_strip(*task) for task in tasks]
    else:
        strips = list(executor.map(lambda task: _deflate_strip(*task), tasks))
    files = []
    for (rows, channels), bounds in zip(prepared, layout, strict=True):
        own, strips = strips[: len(bounds)], strips[len(bounds) :]
        adler = own[0].adler
        for strip in own[1:]:
            adler = adler32_combine(adler, strip.adler, strip.length)
        stream = ZLIB_HEADER + b"".join(strip.body for strip in own) + struct.pack(">I", adler)
        height, width = rows.shape[0], rows.shape[1] // channels
        header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
        files.append(SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return files
