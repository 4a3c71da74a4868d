"""Measures whether an image shows what its prompt asks for, from pixels alone.

The background is the median colour of the border; the foreground is the largest connected region
that differs from it. Its colour is the nearest palette colour to its median (edges eroded away);
its shape is the grammar template that best overlaps it when stretched over its bounding box; its
size is the longer side of that box and its position is where the box's centre lies.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_worker.shapes.dataset import COLORS, HELD_OUT, IMAGE_SIZE, SHAPES, describe, shape_mask

FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND_PIXELS = 12
BORDER = 2
# The grammar draws "small" 14-20 px across, "large" 34-42 and an unsaid size 28-36.
SMALL_MAX_EXTENT = 24
LARGE_MIN_EXTENT = 32
# "in the center" jitters by 2 px; a corner puts the centre at least size/4 off the middle.
CENTER_TOLERANCE = 4.0


@dataclass(frozen=True)
class Measurement:
    """What an image shows; `color`/`shape` are None when no foreground object is found."""

    background: str
    color: str | None
    shape: str | None
    shape_score: float
    foreground_pixels: int
    # (y, x) of the centre of the foreground's bounding box, and the box's longer side in pixels.
    center: tuple[float, float] | None = None
    extent: int = 0


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour name closest to `rgb` (Euclidean distance in RGB)."""
    names = list(COLORS)
    palette = np.array([COLORS[name] for name in names], dtype=np.float32)
    distances = np.linalg.norm(palette - np.asarray(rgb, dtype=np.float32)[None, :], axis=1)
    return names[int(np.argmin(distances))]


def background_rgb(image: np.ndarray) -> np.ndarray:
    """Median colour of the outer `BORDER` pixels."""
    pixels = np.concatenate(
        [
            image[:BORDER].reshape(-1, 3),
            image[-BORDER:].reshape(-1, 3),
            image[:, :BORDER].reshape(-1, 3),
            image[:, -BORDER:].reshape(-1, 3),
        ]
    )
    return np.asarray(np.median(pixels.astype(np.float32), axis=0))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (iterative flood fill)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    rows, cols = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < rows and 0 <= nx < cols and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return np.asarray(labels == best_label) if best_size else np.zeros_like(mask)


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in `mask`."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The template (from the grammar) with the best IoU over the mask's bounding box, and that IoU."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[top:bottom, left:right]
    height, width = crop.shape
    best, best_score = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, width, height, (height, width), supersample=3) >= 0.5
        union = np.logical_or(template, crop).sum()
        score = float(np.logical_and(template, crop).sum() / union) if union else 0.0
        if score > best_score:
            best, best_score = shape, score
    return best, best_score


def measure(image: np.ndarray) -> Measurement:
    """Background colour, foreground colour and shape of an (H, W, 3) uint8 image."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    background = background_rgb(pixels)
    distance = np.linalg.norm(pixels - background[None, None, :], axis=-1)
    mask = largest_component(distance > FOREGROUND_DISTANCE)
    count = int(mask.sum())
    if count < MIN_FOREGROUND_PIXELS:
        return Measurement(nearest_color(background), None, None, 0.0, count)
    inner = erode(mask)
    core = inner if inner.sum() >= MIN_FOREGROUND_PIXELS // 2 else mask
    color = nearest_color(np.median(pixels[core], axis=0))
    shape, score = classify_shape(mask)
    ys, xs = np.nonzero(mask)
    # The box's centre, not the centre of mass: a triangle's mass sits low in the box it was drawn in.
    center = (float(ys.min() + ys.max() + 1) / 2, float(xs.min() + xs.max() + 1) / 2)
    extent = int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    return Measurement(nearest_color(background), color, shape, score, count, center, extent)


def size_word(extent: int) -> str | None:
    """The size word ("small", "large") for a foreground this many pixels across; None in between."""
    if extent <= SMALL_MAX_EXTENT:
        return "small"
    return "large" if extent >= LARGE_MIN_EXTENT else None


def position_word(center: tuple[float, float]) -> str | None:
    """The position word for a point: "center", or the corner ("top left", ...) it lies towards;
    None for a point near the middle of one axis but not the other."""
    dy, dx = (coordinate - IMAGE_SIZE / 2 for coordinate in center)
    if max(abs(dy), abs(dx)) <= CENTER_TOLERANCE:
        return "center"
    if min(abs(dy), abs(dx)) <= CENTER_TOLERANCE:
        return None
    return f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"


def adheres(
    image: np.ndarray, color: str, shape: str, size: str | None = None, position: str | None = None
) -> bool:
    """True when the image's foreground has the asked colour and shape, and size and position when
    they are asked for."""
    found = measure(image)
    if found.color != color or found.shape != shape or found.center is None:
        return False
    if size is not None and size_word(found.extent) != size:
        return False
    return position is None or position_word(found.center) == position


def redness(image: np.ndarray) -> float:
    """Fraction of pixels nearer to the palette's red than to any other palette colour."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3].reshape(-1, 3)
    names = list(COLORS)
    palette = np.array([COLORS[name] for name in names], dtype=np.float32)
    nearest = np.argmin(np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1), axis=1)
    return float(np.mean(nearest == names.index("red")))


@dataclass(frozen=True)
class AdherenceCase:
    """One prompt to draw and what its foreground must be (size and position only if given)."""

    prompt: str
    color: str
    shape: str
    size: str | None = None
    position: str | None = None


# A generator: prompts and seeds in, (H, W, 3) uint8 images out.
Draw = Callable[[Sequence[str], Sequence[int]], Sequence[np.ndarray]]


def hits_per_case(draw: Draw, cases: Iterable[AdherenceCase], seeds: Sequence[int]) -> dict[str, int]:
    """For each case's prompt, on how many of `seeds` the image matches it (colour and shape, and
    size and position when asked): where `adherence` averages, this shows which pair falls short."""
    hits = {}
    for case in cases:
        images = draw([case.prompt] * len(seeds), seeds)
        hits[case.prompt] = sum(
            adheres(image, case.color, case.shape, case.size, case.position) for image in images
        )
    return hits


def hit_rate(hits: dict[str, int], seeds_per_case: int) -> float:
    """The fraction of images right, from `hits_per_case`'s counts."""
    return sum(hits.values()) / (len(hits) * seeds_per_case) if hits and seeds_per_case else 0.0


def adherence(draw: Draw, cases: Iterable[AdherenceCase], seeds: Sequence[int]) -> float:
    """Fraction of (case, seed) pairs whose image matches the case's colour and shape."""
    return hit_rate(hits_per_case(draw, cases, seeds), len(seeds))


def pipeline_drawer(pipeline: object, **call_kwargs: object) -> Draw:
    """A `Draw` that calls a diffusers pipeline with one CPU generator per seed."""
    import torch

    def draw(prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = dict(call_kwargs)
        if isinstance(kwargs.get("negative_prompt"), str):
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
        with torch.inference_mode():
            output = pipeline(prompt=list(prompts), generator=generators, output_type="np", **kwargs)  # type: ignore[operator]
        return [np.asarray(np.round(image * 255), dtype=np.uint8) for image in output.images]

    return draw


def evaluation_cases(held_out: bool) -> list[AdherenceCase]:
    """Prompts from the grammar: the held-out colour/shape pairs, or one seen pair per shape.

    Each pair gets a background that differs from its colour (rotating through the palette), so a
    prompt reads "a red square on a blue background".
    """
    if held_out:
        pairs = sorted(HELD_OUT)
    else:
        names = list(COLORS)
        pairs = [(names[(3 * index + 2) % len(names)], shape) for index, shape in enumerate(SHAPES)]
        pairs = [pair for pair in pairs if pair not in HELD_OUT]
    cases = []
    names = list(COLORS)
    for index, (color, shape) in enumerate(pairs):
        bg = names[(names.index(color) + 2 + index) % len(names)]
        if bg == color:
            bg = names[(names.index(color) + 1) % len(names)]
        cases.append(AdherenceCase(describe(color, shape, bg), color, shape))
    return cases


# Seen colour/shape pairs with a size and a position: each corner, both sizes, and the centre.
PLACEMENT_CASES = tuple(
    AdherenceCase(describe(color, shape, background, size, position), color, shape, size, position)
    for color, shape, background, size, position in (
        ("red", "circle", "white", "small", "top left"),
        ("blue", "square", "yellow", "large", "bottom right"),
        ("green", "triangle", "black", "small", "top right"),
        ("orange", "cross", "white", "large", "bottom left"),
        ("purple", "diamond", "white", "small", "center"),
    )
)
NEGATIVE_PROMPT_CASE = ("a red circle", "red")
# The README's pictures: (prompt, seed), drawn at the model's defaults. The third is a held-out pair.
EXAMPLES = (
    ("a red circle on a blue background", 1),
    ("a small yellow square in the top left on a black background", 2),
    ("a blue triangle on a white background", 3),
)


def mean_redness(draw: Draw, prompt: str, seeds: Sequence[int]) -> float:
    """Mean `redness` of the images drawn for `prompt` over `seeds`."""
    return float(np.mean([redness(image) for image in draw([prompt] * len(seeds), seeds)]))


def measure_model(
    pipeline: Any, seeds_per_prompt: int, *, steps: int, guidance_scale: float
) -> dict[str, Any]:
    """The figures the README and training.json report: adherence on seen and held-out pairs at the
    given guidance (with the seeds each prompt got right) and at 1.0, size and position as asked, red
    pixels with and without a "red" negative prompt, time per image."""
    seeds = list(range(1000, 1000 + seeds_per_prompt))
    seen, held = evaluation_cases(held_out=False), evaluation_cases(held_out=True)
    guided = pipeline_drawer(pipeline, num_inference_steps=steps, guidance_scale=guidance_scale)
    unguided = pipeline_drawer(pipeline, num_inference_steps=steps, guidance_scale=1.0)
    prompt, negative = NEGATIVE_PROMPT_CASE
    avoiding = pipeline_drawer(
        pipeline, num_inference_steps=steps, guidance_scale=guidance_scale, negative_prompt=negative
    )
    seen_hits, held_hits = hits_per_case(guided, seen, seeds), hits_per_case(guided, held, seeds)
    started = time.perf_counter()
    guided(["a red circle"], [0])
    seconds_per_image = time.perf_counter() - started
    return {
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "seeds_per_prompt": seeds_per_prompt,
        "prompts_seen": [case.prompt for case in seen],
        "prompts_held_out": [case.prompt for case in held],
        "adherence_seen": hit_rate(seen_hits, len(seeds)),
        "adherence_held_out": hit_rate(held_hits, len(seeds)),
        "hits_per_prompt": {**seen_hits, **held_hits},
        "adherence_seen_guidance_1": adherence(unguided, seen, seeds),
        "adherence_held_out_guidance_1": adherence(unguided, held, seeds),
        "prompts_placement": [case.prompt for case in PLACEMENT_CASES],
        "adherence_size_position": adherence(guided, PLACEMENT_CASES, seeds),
        "redness_a_red_circle": mean_redness(guided, prompt, seeds),
        "redness_a_red_circle_negative_red": mean_redness(avoiding, prompt, seeds),
        "seconds_per_image_one_call": round(seconds_per_image, 3),
    }


def load_for_evaluation(directory: Path) -> tuple[Any, int, float]:
    """The pipeline saved in `directory` (progress bars off) and the steps and guidance scale its
    worker_defaults.json gives requests, which is what the worker would serve it at."""
    from diffusers import DiffusionPipeline

    from diffusion_worker.model_source import ModelLocation, model_defaults

    defaults = model_defaults(ModelLocation(str(directory), from_hub=False))
    pipeline = DiffusionPipeline.from_pretrained(directory)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, int(defaults["num_inference_steps"]), float(defaults["guidance_scale"])


def main(argv: Sequence[str] | None = None) -> int:
    """Print `measure_model` for a pipeline directory, at its worker_defaults.json settings."""
    import torch

    from diffusion_worker.shapes import WEIGHTS_DIR

    parser = argparse.ArgumentParser(prog="python -m diffusion_worker.shapes.evaluate", description=__doc__)
    parser.add_argument("model", type=Path, nargs="?", default=WEIGHTS_DIR, help="pipeline directory")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: worker_defaults.json")
    parser.add_argument(
        "--examples", type=Path, default=None, help="also write the README's example PNGs here"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline, steps, guidance = load_for_evaluation(args.model)
    if args.guidance_scale is not None:
        guidance = args.guidance_scale
    print(json.dumps(measure_model(pipeline, args.seeds, steps=steps, guidance_scale=guidance), indent=2))
    if args.examples:
        from PIL import Image

        args.examples.mkdir(parents=True, exist_ok=True)
        draw = pipeline_drawer(pipeline, num_inference_steps=steps, guidance_scale=guidance)
        for index, (prompt, seed) in enumerate(EXAMPLES, start=1):
            (image,) = draw([prompt], [seed])
            Image.fromarray(image).save(args.examples / f"shapes-example-{index}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
