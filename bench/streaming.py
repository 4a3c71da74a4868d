"""Cost of streamed partial images: one pipeline call with 0 previews vs with 1-3 previews.

A preview is the pipeline's own VAE decode of the predicted clean latent at a step, so its cost is
roughly one VAE decode per preview per image. Measured on the worker's engine (no HTTP) so only the
preview work differs; calls alternate between settings so a change in machine load hits all alike.

    python bench/streaming.py                       # builtin:shapes, its defaults
    python bench/streaming.py --model /path/to/pipeline --size 512x512 --steps 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from diffusion_worker.engine import GenerationBatch, load_engines
from diffusion_worker.previews import PreviewPlan, preview_steps
from diffusion_worker.settings import WorkerSettings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    (engine,) = load_engines(WorkerSettings(model=args.model))
    info = engine.info
    width, height = (int(v) for v in args.size.split("x")) if args.size else info.default_size
    steps = args.steps or info.default_steps
    batch = GenerationBatch(
        prompts=["a red circle on a blue background"] * args.batch,
        negative_prompts=None,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=info.default_guidance_scale,
        seeds=list(range(args.batch)),
    )
    received: list[Any] = []

    def plan(count: int) -> PreviewPlan | None:
        if count == 0:
            return None
        at = preview_steps(steps, count)
        return PreviewPlan(
            {step: list(range(args.batch)) for step in at}, lambda *event: received.append(event)
        )

    counts = [0, 1, 2, 3]
    for count in counts:  # warm-up
        engine.generate(batch, None, plan(count))
    timings: dict[int, list[float]] = {count: [] for count in counts}
    for _ in range(args.repeats):
        for count in counts:
            started = time.perf_counter()
            engine.generate(batch, None, plan(count))
            timings[count].append(time.perf_counter() - started)
    base = statistics.median(timings[0])
    rows = []
    for count in counts:
        median = statistics.median(timings[count])
        rows.append(
            {
                "partial_images": count,
                "median_s": median,
                "min_s": min(timings[count]),
                "max_s": max(timings[count]),
                "ratio_vs_no_previews": median / base,
                "extra_ms_per_preview_image": (median - base) * 1000 / (count * args.batch) if count else 0.0,
            }
        )
        print(
            f"partial_images={count}: {median * 1000:.1f} ms per call ({median / base:.3f}x), "
            f"{rows[-1]['extra_ms_per_preview_image']:.1f} ms per preview image"
        )
    result = {
        "benchmark": "streaming-previews",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "device": engine.device,
        },
        "versions": {name: metadata.version(name) for name in ("torch", "diffusers")},
        "settings": {
            "model": args.model,
            "pipeline": info.pipeline_class,
            "size": f"{width}x{height}",
            "steps": steps,
            "images_per_call": args.batch,
            "repeats": args.repeats,
        },
        "results": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"streaming-cpu{os.cpu_count()}-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
