"""bench/encoding.py's measurement, on images small enough for a unit test."""

from __future__ import annotations

import numpy as np

from support.bench_scripts import load_bench_script

encoding = load_bench_script("encoding")


def test_measure_reports_pillow_and_each_thread_count() -> None:
    row = encoding.measure(encoding.noise_image(48), thread_counts=[1, 2], repeats=2)
    assert row["pillow"]["median_ms"] > 0 and row["pillow"]["bytes"] > 48 * 48 * 3
    for threads in ("threads_1", "threads_2"):
        assert row[threads]["median_ms"] > 0 and row[threads]["speedup_vs_pillow"] > 0
    # The same pixels give the same bytes whatever the threads.
    assert row["threads_1"]["bytes"] == row["threads_2"]["bytes"]


def test_natural_image_varies_less_between_neighbours_than_noise() -> None:
    image = encoding.natural_image(64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    neighbour_step = np.abs(np.diff(image.astype(int), axis=1)).mean()
    noise_step = np.abs(np.diff(encoding.noise_image(64).astype(int), axis=1)).mean()
    assert 0 < neighbour_step < noise_step / 2  # 22.6 vs 86.6 at 64 px
