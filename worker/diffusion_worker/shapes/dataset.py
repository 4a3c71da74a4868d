"""Procedural images of one coloured shape on a plain background, with the prompt that describes them.

Grammar: "a [small|large] [COLOR] SHAPE [in the POSITION] [on a COLOR background]". A colour left out
is drawn at random; a size or position left out means medium-large near the centre; a background
left out means white (black behind a white shape), as a product photo. So "a circle" is a circle of
any colour in the middle of a white image. A colour word alone ("red") means that colour filling the
image, which is what gives a negative prompt "red" something to steer away from. Nothing is
downloaded: every image is drawn on the fly from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# How often each shape is drawn, relative to the others. A diamond is the hardest: its template sits
# between the circle's and the cross's, so blunted or pinched tips make it one of them. With equal
# shares one diamond prompt came out right on at most 5 of 8 seeds in two of three training runs.
SHAPE_WEIGHTS: dict[str, float] = {"circle": 1, "square": 1, "triangle": 1, "diamond": 2, "cross": 1}
_SHAPE_P = np.array([SHAPE_WEIGHTS[shape] for shape in SHAPES]) / sum(SHAPE_WEIGHTS.values())
SIZES: dict[str, tuple[int, int]] = {"small": (14, 20), "large": (34, 42)}
# A prompt that names no size or position gets a medium-large shape near the centre, as a photo
# frames its subject: small shapes and corners exist only where the prompt asks for them.
ANY_SIZE = (28, 36)
CENTER_JITTER = 2.0
DEFAULT_BACKGROUND = "white"
DEFAULT_BACKGROUND_BEHIND_WHITE = "black"
AUTOENCODER_SIZES = (12, 46)
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
MARGIN = 3
CROSS_HALF_WIDTH = 0.3

# Foreground colour + shape pairs never drawn in training; evaluation asks for them anyway.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "diamond"), ("purple", "cross")}
)

# Every word the grammar uses, so the tokenizer can give each one a single token.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "in", "the", "on", "background", *SIZES, *COLORS, *SHAPES]
        + [word for position in POSITIONS for word in position.split()]
    )
)


@dataclass(frozen=True)
class Scene:
    """What one image shows; `prompt` may leave some of it unsaid."""

    color: str
    shape: str
    background: str
    center: tuple[float, float]
    size: float
    prompt: str


def shape_mask(
    shape: str, width: float, height: float, out: tuple[int, int], supersample: int = 1
) -> np.ndarray:
    """Coverage in [0, 1] of `shape` filling a width x height box centred in an `out` (h, w) array.

    Each shape fills its box exactly (circle touches all four sides, triangle points up), which is
    what lets `evaluate` classify a shape by fitting these same templates to a bounding box.
    """
    rows, cols = out
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(rows)[:, None] + offsets[None, :]).reshape(-1) - rows / 2
    xs = (np.arange(cols)[:, None] + offsets[None, :]).reshape(-1) - cols / 2
    v = ys[:, None] / (height / 2)
    u = xs[None, :] / (width / 2)
    inside = _inside(shape, u, v)
    coverage = inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3))
    return np.asarray(coverage, dtype=np.float32)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    box = np.asarray((au <= 1) & (av <= 1))
    if shape == "circle":
        return np.asarray(u * u + v * v <= 1)
    if shape == "square":
        return box
    if shape == "triangle":
        return np.asarray(box & (au <= (v + 1) / 2))
    if shape == "diamond":
        return np.asarray(au + av <= 1)
    if shape == "cross":
        return np.asarray(box & ((au <= CROSS_HALF_WIDTH) | (av <= CROSS_HALF_WIDTH)))
    raise ValueError(f"`shape` must be one of {', '.join(SHAPES)}, got {shape!r}")


def render(scene: Scene, supersample: int = 2) -> np.ndarray:
    """The scene as an (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB array."""
    cy, cx = scene.center
    ys = np.arange(IMAGE_SIZE, dtype=np.float32)
    offsets = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample
    grid = (ys[:, None] + offsets[None, :]).reshape(-1)
    v = (grid[:, None] - cy) / (scene.size / 2)
    u = (grid[None, :] - cx) / (scene.size / 2)
    coverage = _inside(scene.shape, u, v).reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample)
    alpha = coverage.mean(axis=(1, 3), dtype=np.float32)[..., None]
    foreground = np.array(COLORS[scene.color], dtype=np.float32)
    background = np.array(COLORS[scene.background], dtype=np.float32)
    image = alpha * foreground + (1 - alpha) * background
    return np.asarray(np.round(image), dtype=np.uint8)


def _position_center(position: str, size: float, rng: np.random.Generator) -> tuple[float, float]:
    low, high = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
    middle = IMAGE_SIZE / 2
    if position == "center":
        jitter = rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2)
        return (middle + float(jitter[0]), middle + float(jitter[1]))
    vertical, horizontal = position.split()
    y = (
        rng.uniform(low, max(low, middle - size / 4))
        if vertical == "top"
        else rng.uniform(min(high, middle + size / 4), high)
    )
    x = (
        rng.uniform(low, max(low, middle - size / 4))
        if horizontal == "left"
        else rng.uniform(min(high, middle + size / 4), high)
    )
    return (y, x)


def default_background(color: str) -> str:
    """The background of a prompt that names none: white, or black behind a white shape."""
    return DEFAULT_BACKGROUND_BEHIND_WHITE if color == DEFAULT_BACKGROUND else DEFAULT_BACKGROUND


def swatch(color: str) -> Scene:
    """`color` filling the whole image: what a colour word alone ("red") is trained to mean."""
    middle = IMAGE_SIZE / 2
    return Scene(color, SHAPES[0], color, (middle, middle), float(IMAGE_SIZE), color)


def describe(
    color: str | None,
    shape: str,
    background: str | None = None,
    size: str | None = None,
    position: str | None = None,
) -> str:
    """The grammar's sentence for the given words; None leaves a word out."""
    words = ["a"]
    if size:
        words.append(size)
    if color:
        words.append(color)
    words.append(shape)
    if position:
        words += ["in", "the", position]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def sample_scene(
    rng: np.random.Generator,
    *,
    color: str | None = None,
    shape: str | None = None,
    background: str | None = None,
    exclude: frozenset[tuple[str, str]] = HELD_OUT,
    say_color: float = 0.9,
    say_background: float = 0.75,
    say_size: float = 0.3,
    say_position: float = 0.3,
) -> Scene:
    """A random scene (given words fixed) whose prompt says each part with the given probability."""
    color_names = list(COLORS)
    while True:
        fg = color or color_names[rng.integers(len(color_names))]
        sh = shape or SHAPES[int(rng.choice(len(SHAPES), p=_SHAPE_P))]
        if (fg, sh) not in exclude or (color and shape):
            break
    say_bg = background is not None or rng.random() < say_background
    bg = background or (fg if say_bg else default_background(fg))
    while bg == fg:
        bg = color_names[rng.integers(len(color_names))]
    size_word = list(SIZES)[rng.integers(len(SIZES))] if rng.random() < say_size else None
    low, high = SIZES[size_word] if size_word else ANY_SIZE
    size = float(rng.uniform(low, high))
    position = POSITIONS[rng.integers(len(POSITIONS))] if rng.random() < say_position else None
    center = _position_center(position or "center", size, rng)
    prompt = describe(
        fg if (color or rng.random() < say_color) else None,
        sh,
        bg if say_bg else None,
        size_word,
        position,
    )
    return Scene(fg, sh, bg, (float(center[0]), float(center[1])), size, prompt)


def training_example(
    rng: np.random.Generator, drop: float = 0.1, fragment: float = 0.05
) -> tuple[Scene, str]:
    """A scene and the prompt it is trained with: usually its grammar sentence, sometimes empty (for
    classifier-free guidance) or words without the grammar: a colour alone is a `swatch`, and
    "circle" or "red circle" is the scene (so a negative prompt means something to the model)."""
    scene = sample_scene(rng)
    roll = rng.random()
    if roll < drop:
        return scene, ""
    if roll < drop + fragment:
        kind = int(rng.integers(3))
        if kind == 0:
            return swatch(scene.color), scene.color
        return scene, scene.shape if kind == 1 else f"{scene.color} {scene.shape}"
    return scene, scene.prompt


def autoencoder_batch(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Images for the autoencoder: shapes of any size anywhere (wider than what prompts ask for, so
    the latent space is not tuned to one framing), and now and then a swatch."""
    scenes = []
    for _ in range(batch_size):
        scene = sample_scene(rng)
        if rng.random() < 0.05:
            scene = swatch(scene.color)
        else:
            size = float(rng.uniform(*AUTOENCODER_SIZES))
            low, high = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
            center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
            scene = Scene(scene.color, scene.shape, scene.background, center, size, scene.prompt)
        scenes.append(scene)
    return pixels(scenes)


def pixels(scenes: list[Scene]) -> np.ndarray:
    """The scenes rendered as float32 (B, 3, H, W) in [-1, 1], the range the autoencoder works in."""
    images = np.stack([render(scene).transpose(2, 0, 1) for scene in scenes]) / 127.5 - 1
    return images.astype(np.float32)


def training_batch(rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """`batch_size` images as float32 (B, 3, H, W) in [-1, 1] and their training prompts."""
    scenes, prompts = zip(*(training_example(rng) for _ in range(batch_size)), strict=True)
    return pixels(list(scenes)), list(prompts)
