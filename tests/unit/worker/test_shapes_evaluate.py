"""The adherence measure of builtin:shapes, checked on images whose content is known."""

from __future__ import annotations

import numpy as np

from diffusion_worker.shapes import dataset, evaluate


def blur(image: np.ndarray) -> np.ndarray:
    """A 3x3 box blur, like the soft edges a small decoder draws."""
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3))
    return np.asarray(np.round(total / 9), dtype=np.uint8)


def scenes(seed: int, count: int) -> list[dataset.Scene]:
    rng = np.random.default_rng(seed)
    return [dataset.sample_scene(rng, exclude=frozenset()) for _ in range(count)]


def test_measure_recovers_color_shape_and_background_of_drawn_scenes() -> None:
    for scene in scenes(0, 150):
        found = evaluate.measure(dataset.render(scene))
        assert (found.color, found.shape, found.background) == (scene.color, scene.shape, scene.background)


def test_measure_survives_blur_and_noise() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    cases = scenes(2, 100)
    for scene in cases:
        noisy = blur(dataset.render(scene)).astype(np.float32) + rng.normal(0, 12, (64, 64, 3))
        image = np.asarray(np.clip(noisy, 0, 255), dtype=np.uint8)
        hits += evaluate.adheres(image, scene.color, scene.shape)
    assert hits / len(cases) >= 0.97


def test_wrong_color_or_shape_does_not_adhere() -> None:
    scene = dataset.Scene("green", "triangle", "white", (32.0, 32.0), 36.0, "a green triangle")
    image = dataset.render(scene)
    assert evaluate.adheres(image, "green", "triangle")
    assert not evaluate.adheres(image, "green", "square")
    assert not evaluate.adheres(image, "blue", "triangle")


def test_plain_image_has_no_foreground() -> None:
    image = np.full((64, 64, 3), dataset.COLORS["yellow"], dtype=np.uint8)
    found = evaluate.measure(image)
    assert found.color is None and found.shape is None and found.background == "yellow"
    assert not evaluate.adheres(image, "yellow", "circle")


def test_each_template_classifies_as_itself() -> None:
    for shape in dataset.SHAPES:
        mask = dataset.shape_mask(shape, 30, 30, (30, 30), supersample=4) >= 0.5
        assert evaluate.classify_shape(mask)[0] == shape


def test_redness_counts_red_pixels() -> None:
    scene = dataset.Scene("red", "square", "white", (32.0, 32.0), 32.0, "a red square")
    assert abs(evaluate.redness(dataset.render(scene)) - 32 * 32 / 64**2) < 0.02
    assert evaluate.redness(np.full((64, 64, 3), dataset.COLORS["blue"], dtype=np.uint8)) == 0.0


def test_adherence_counts_hits_over_cases_and_seeds() -> None:
    def draw(prompts: object, seeds: list[int]) -> list[np.ndarray]:
        # Seed 0 draws what was asked (a red circle), seed 1 draws a blue circle.
        color = {0: "red", 1: "blue"}
        return [
            dataset.render(dataset.Scene(color[seed], "circle", "white", (32.0, 32.0), 30.0, ""))
            for seed in seeds
        ]

    case = evaluate.AdherenceCase("a red circle on a white background", "red", "circle")
    other = evaluate.AdherenceCase("a blue circle", "blue", "circle")
    assert evaluate.adherence(draw, [case], [0, 1]) == 0.5
    assert evaluate.hits_per_case(draw, [case, other], [0, 1, 1]) == {case.prompt: 1, other.prompt: 2}


def test_evaluation_cases_cover_every_held_out_pair_and_only_seen_pairs_otherwise() -> None:
    held = evaluate.evaluation_cases(held_out=True)
    seen = evaluate.evaluation_cases(held_out=False)
    assert {(case.color, case.shape) for case in held} == set(dataset.HELD_OUT)
    assert not {(case.color, case.shape) for case in seen} & dataset.HELD_OUT
    assert {case.shape for case in seen} == set(dataset.SHAPES)
    for case in held + seen:
        assert case.prompt.startswith(f"a {case.color} {case.shape} on a ")


def said_size_and_position(prompt: str) -> tuple[str | None, str | None]:
    words = f" {prompt} "
    size = next((word for word in dataset.SIZES if f" {word} " in words), None)
    position = next((place for place in dataset.POSITIONS if f" in the {place} " in words), None)
    return size, position


def test_measure_recovers_the_size_and_position_a_prompt_asks_for() -> None:
    rng = np.random.default_rng(3)
    checked = hits = 0
    for _ in range(300):
        scene = dataset.sample_scene(rng, exclude=frozenset(), say_size=1.0, say_position=1.0)
        size, position = said_size_and_position(scene.prompt)
        assert size is not None and position is not None, scene.prompt
        checked += 1
        hits += evaluate.adheres(dataset.render(scene), scene.color, scene.shape, size, position)
    # A small shape "in the top left" may sit as little as 4 px off the middle and read as neither
    # (2 of these 300 miss: that, and a 16 px cross read as a diamond).
    assert hits / checked >= 0.98


def test_size_and_position_words_of_known_placements() -> None:
    assert [evaluate.size_word(extent) for extent in (16, 30, 40)] == ["small", None, "large"]
    assert evaluate.position_word((32.0, 33.0)) == "center"
    assert evaluate.position_word((12.0, 50.0)) == "top right"
    assert evaluate.position_word((50.0, 14.0)) == "bottom left"
    assert evaluate.position_word((32.0, 12.0)) is None


def test_a_shape_in_the_wrong_place_or_size_does_not_adhere() -> None:
    scene = dataset.Scene("red", "circle", "white", (16.0, 16.0), 16.0, "")
    image = dataset.render(scene)
    assert evaluate.adheres(image, "red", "circle", "small", "top left")
    assert not evaluate.adheres(image, "red", "circle", "large", "top left")
    assert not evaluate.adheres(image, "red", "circle", "small", "bottom left")
    assert evaluate.adheres(image, "red", "circle")


def test_placement_cases_are_seen_pairs_in_every_corner_and_the_center() -> None:
    assert {case.position for case in evaluate.PLACEMENT_CASES} == set(dataset.POSITIONS)
    assert {case.size for case in evaluate.PLACEMENT_CASES} == set(dataset.SIZES)
    for case in evaluate.PLACEMENT_CASES:
        assert (case.color, case.shape) not in dataset.HELD_OUT
        assert said_size_and_position(case.prompt) == (case.size, case.position)
