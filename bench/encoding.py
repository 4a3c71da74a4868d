"""PNG encoding benchmark: the worker's threaded writer vs Pillow's `Image.save(format="PNG")`.

A PNG is what the images API returns by default, and Pillow, what a user writing the raw loop
would call (and what the worker called before), encodes it on one thread. Measured in one run, on
one machine, for 512x512 and 1024x1024 RGB images of two kinds:
- `natural`: a 1/f amplitude spectrum, as photographs have (smooth, with texture at every scale);
  compresses about 1.3:1;
- `noise`: uniform random pixels, the worst case: nothing to compress, every filter equally bad.
Reports the median time per image and the file size of each, and the speedup over Pillow. Every
file is decoded back and compared with its pixels first. Then, for the natural images, what each
output format and compression costs on one thread (`formats_one_thread`). Never part of `make test`.

    python bench/encoding.py                # writes bench/results/encoding-<machine>-<date>.json
    python bench/encoding.py --threads 1 4  # thread counts to measure (default: 1 and all CPUs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion_worker.encoding import ImageEncoder, encode_image, usable_cpus
from diffusion_worker.png import DEFAULT_LEVEL

SIZES = (512, 1024)


def natural_image(size: int, seed: int = 0) -> np.ndarray:
    """An RGB image whose amplitude spectrum falls as 1/f, like a photograph's."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    channels = []
    for _ in range(3):
        spectrum = rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
        field = np.fft.ifft2(spectrum / np.maximum(frequency, 1 / size)).real
        channels.append((field - field.min()) / np.ptp(field) * 255)
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def noise_image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def pillow_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=DEFAULT_LEVEL)
    return buffer.getvalue()


def worker_png(encoder: ImageEncoder, image: Image.Image) -> bytes:
    return encoder.encode([image], "png")[0]


def timed(encode: Callable[[], bytes], repeats: int) -> tuple[list[float], bytes]:
    """Wall-clock seconds of `repeats` calls after one warm-up, and the bytes of the last."""
    blob = encode()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        blob = encode()
        times.append(time.perf_counter() - started)
    return times, blob


def decodes_to(blob: bytes, pixels: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(Image.open(io.BytesIO(blob))), pixels))


def measure(pixels: np.ndarray, thread_counts: list[int], repeats: int) -> dict[str, Any]:
    """Pillow, then the threaded writer at each thread count, on one image."""
    times, blob = timed(lambda: pillow_png(pixels), repeats)
    if not decodes_to(blob, pixels):
        raise AssertionError("Pillow's PNG does not decode to its pixels")
    pillow_ms = statistics.median(times) * 1000
    row: dict[str, Any] = {"pillow": {"median_ms": round(pillow_ms, 2), "bytes": len(blob)}}
    image = Image.fromarray(pixels)
    for threads in thread_counts:
        encoder = ImageEncoder(threads)  # what the worker runs: PIL image in, PNG bytes out
        try:
            times, blob = timed(partial(worker_png, encoder, image), repeats)
        finally:
            encoder.close()
        if not decodes_to(blob, pixels):
            raise AssertionError(f"the threaded writer's PNG ({threads} threads) does not decode back")
        median_ms = statistics.median(times) * 1000
        row[f"threads_{threads}"] = {
            "median_ms": round(median_ms, 2),
            "min_ms": round(min(times) * 1000, 2),
            "bytes": len(blob),
            "speedup_vs_pillow": round(pillow_ms / median_ms, 2),
        }
    return row


FORMATS = (("png", None), ("jpeg", 100), ("jpeg", 90), ("webp", 100), ("webp", 90))


def other_formats(pixels: np.ndarray, repeats: int) -> dict[str, Any]:
    """Each output format and compression as the worker encodes one image (`encode_image`, one
    thread: PNG's strips in turn, JPEG and WEBP through Pillow)."""
    image = Image.fromarray(pixels)
    row: dict[str, Any] = {}
    for output_format, compression in FORMATS:
        times, blob = timed(partial(encode_image, image, output_format, compression), repeats)
        name = output_format if compression is None else f"{output_format}-{compression}"
        row[name] = {"median_ms": round(statistics.median(times) * 1000, 2), "bytes": len(blob)}
    return row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "usable_cpus": usable_cpus(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    import zlib

    return {
        "numpy": metadata.version("numpy"),
        "pillow": metadata.version("pillow"),
        "isal": metadata.version("isal"),
        "zlib (Python's)": zlib.ZLIB_RUNTIME_VERSION,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and every CPU)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    cpus = usable_cpus()
    thread_counts = args.threads or sorted({1, cpus})
    results = {}
    for size in SIZES:
        for kind, make in (("natural", natural_image), ("noise", noise_image)):
            name = f"{size}x{size}-{kind}"
            results[name] = measure(make(size), thread_counts, args.repeats)
            print(name, json.dumps(results[name]))
    formats = {}
    for size in SIZES:
        name = f"{size}x{size}-natural"
        formats[name] = other_formats(natural_image(size), max(3, args.repeats // 3))
        print(name, json.dumps(formats[name]))
    now = dt.datetime.now(dt.UTC)
    report = {
        "benchmark": "png-encoding",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {"isal_level": DEFAULT_LEVEL, "repeats": args.repeats, "threads": thread_counts},
        "results": results,
        "formats_one_thread": formats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"encoding-cpu{cpus}-{now.date()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
