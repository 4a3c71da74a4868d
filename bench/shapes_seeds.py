"""How `make train-demo-model`'s recipe fares over training seeds: measure several trained pipelines.

Each directory is one `python -m diffusion_worker.shapes.train --output DIR ...` run. Every one is
measured the same way here, with `evaluate.measure_model` at the model's defaults and --seeds
seeds per prompt (training.json has 8, where a pair drawn right on 2 of 3 seeds can read anything
from 3 to 8 of 8), then timed (5 one-image calls at the defaults, after the measurement warmed it
up), and written with its training command, seed and wall times from training.json:

    python bench/shapes_seeds.py --seeds 32 --out bench/results/NAME.json \\
        "v10 seed 0=/work/shapes-s0" "v10 seed 1=/work/shapes-s1"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from serving import machine, versions

TRAINING_KEYS = (
    "command",
    "seed",
    "vae_steps",
    "unet_steps",
    "wall_seconds_vae",
    "wall_seconds_total_training",
    "final_loss_mean_last_100",
)


def measure_run(directory: Path, seeds: int, threads: int) -> dict[str, Any]:
    """training.json's record of the run, plus `measure_model` over `seeds` seeds per prompt."""
    import torch

    from diffusion_worker.shapes import evaluate

    torch.set_num_threads(threads)
    training = json.loads((directory / "training.json").read_text())
    pipeline, steps, guidance = evaluate.load_for_evaluation(directory)
    figures = evaluate.measure_model(pipeline, seeds, steps=steps, guidance_scale=guidance)
    draw = evaluate.pipeline_drawer(pipeline, num_inference_steps=steps, guidance_scale=guidance)
    seconds = []
    for seed in range(5):
        started = time.perf_counter()
        draw(["a red circle"], [seed])
        seconds.append(round(time.perf_counter() - started, 3))
    return {
        **{key: training.get(key) for key in TRAINING_KEYS},
        "seconds_per_image_5_calls": seconds,
        "seconds_per_image_median": sorted(seconds)[2],
        "training_threads": training["machine"]["threads"],
        "metrics_at_training": {
            key: training["metrics"][key] for key in ("adherence_seen", "adherence_held_out")
        }
        if training.get("metrics")
        else None,
        "metrics": figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=DIRECTORY, one per trained pipeline")
    parser.add_argument("--seeds", type=int, default=32, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while measuring")
    parser.add_argument("--note", default="", help="what the runs were, for the record")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        name, separator, directory = spec.partition("=")
        if not separator:
            parser.error(f"expected NAME=DIRECTORY, got {spec!r}")
        runs.append({"run": name, **measure_run(Path(directory), args.seeds, args.threads)})
        print(json.dumps({"run": name, **runs[-1]["metrics"]["hits_per_prompt"]}), flush=True)
    record = {
        "what": "builtin:shapes training runs measured by bench/shapes_seeds.py: adherence at the "
        f"model's defaults over {args.seeds} seeds per prompt (seeds 1000-{999 + args.seeds}); the "
        "issue's target is 0.9 on both seen and held-out pairs. " + args.note,
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
