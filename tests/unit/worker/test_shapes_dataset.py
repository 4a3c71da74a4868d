"""The procedural data of builtin:shapes: grammar, held-out pairs, tokenizer words."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_worker.shapes import dataset
from diffusion_worker.shapes.model import build_tokenizer


def test_grammar_has_at_least_eight_colors_and_four_shapes() -> None:
    assert len(dataset.COLORS) >= 8
    assert len(dataset.SHAPES) >= 4


def test_describe_follows_the_grammar() -> None:
    assert (
        dataset.describe("red", "circle", "blue", size="small", position="top left")
        == "a small red circle in the top left on a blue background"
    )
    assert dataset.describe(None, "square") == "a square"


def test_training_scenes_never_show_a_held_out_pair() -> None:
    rng = np.random.default_rng(0)
    scenes = [dataset.sample_scene(rng) for _ in range(2000)]
    assert not {(scene.color, scene.shape) for scene in scenes} & dataset.HELD_OUT
    assert all(scene.color != scene.background for scene in scenes)


def test_shapes_are_drawn_in_proportion_to_their_weights() -> None:
    rng = np.random.default_rng(3)
    shapes = [dataset.sample_scene(rng).shape for _ in range(6000)]
    total = sum(dataset.SHAPE_WEIGHTS.values())
    for shape in dataset.SHAPES:
        share = shapes.count(shape) / len(shapes)
        assert share == pytest.approx(dataset.SHAPE_WEIGHTS[shape] / total, abs=0.02), shape
    assert dataset.SHAPE_WEIGHTS["diamond"] > dataset.SHAPE_WEIGHTS["circle"]


def test_asking_for_a_held_out_pair_draws_it() -> None:
    color, shape = sorted(dataset.HELD_OUT)[0]
    scene = dataset.sample_scene(np.random.default_rng(1), color=color, shape=shape)
    assert (scene.color, scene.shape) == (color, shape)


def test_prompt_words_match_the_scene() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = dataset.sample_scene(rng, say_color=1.0, say_background=1.0)
        assert scene.prompt.startswith("a ")
        assert f"{scene.color} {scene.shape}" in scene.prompt
        assert scene.prompt.endswith(f"on a {scene.background} background")


def test_rendered_image_has_both_colors_and_stays_inside_the_frame() -> None:
    scene = dataset.Scene("red", "square", "blue", (10.0, 54.0), 14.0, "a small red square")
    image = dataset.render(scene)
    assert image.shape == (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert tuple(image[10, 54]) == dataset.COLORS["red"]
    assert tuple(image[50, 10]) == dataset.COLORS["blue"]


def test_training_batch_is_in_minus_one_to_one_and_seeded() -> None:
    first, prompts = dataset.training_batch(np.random.default_rng(3), 8)
    again, prompts_again = dataset.training_batch(np.random.default_rng(3), 8)
    assert first.shape == (8, 3, 64, 64) and first.min() >= -1 and first.max() <= 1
    assert np.array_equal(first, again) and prompts == prompts_again


@pytest.mark.parametrize("word", dataset.VOCABULARY)
def test_every_grammar_word_is_one_token(word: str) -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer(word).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", f"{word}</w>", "<|endoftext|>"]


def test_words_outside_the_grammar_still_tokenize() -> None:
    tokenizer = build_tokenizer()
    assert len(tokenizer("a teal hexagon").input_ids) > 4


def test_a_prompt_without_size_or_position_gets_a_medium_large_shape_near_the_centre() -> None:
    rng = np.random.default_rng(4)
    middle = dataset.IMAGE_SIZE / 2
    for _ in range(300):
        scene = dataset.sample_scene(rng, say_size=0.0, say_position=0.0)
        assert dataset.ANY_SIZE[0] <= scene.size <= dataset.ANY_SIZE[1]
        assert all(abs(coordinate - middle) <= dataset.CENTER_JITTER for coordinate in scene.center)


def test_a_position_in_the_prompt_moves_the_shape_there() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        scene = dataset.sample_scene(rng, say_position=1.0)
        y, x = scene.center
        if "top left" in scene.prompt:
            assert y < dataset.IMAGE_SIZE / 2 and x < dataset.IMAGE_SIZE / 2
        if "bottom right" in scene.prompt:
            assert y > dataset.IMAGE_SIZE / 2 and x > dataset.IMAGE_SIZE / 2


def test_training_prompts_include_empty_ones_and_bare_words() -> None:
    rng = np.random.default_rng(6)
    examples = [dataset.training_example(rng) for _ in range(1000)]
    empty = [scene for scene, prompt in examples if prompt == ""]
    bare = [(scene, prompt) for scene, prompt in examples if prompt and not prompt.startswith("a ")]
    assert 50 <= len(empty) <= 150 and 20 <= len(bare) <= 80
    for scene, prompt in bare:
        assert prompt in (scene.color, scene.shape, f"{scene.color} {scene.shape}")


def test_a_prompt_without_background_means_white_or_black_behind_white() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        scene = dataset.sample_scene(rng, say_background=0.0)
        assert "background" not in scene.prompt
        assert scene.background == ("black" if scene.color == "white" else "white")
    said = [dataset.sample_scene(rng, say_background=1.0) for _ in range(300)]
    assert all(scene.background != scene.color for scene in said)
    assert len({scene.background for scene in said}) == len(dataset.COLORS)


def test_a_colour_word_alone_is_trained_as_that_colour_filling_the_image() -> None:
    rng = np.random.default_rng(8)
    swatches = [
        (scene, prompt)
        for scene, prompt in (dataset.training_example(rng) for _ in range(2000))
        if prompt in dataset.COLORS
    ]
    assert swatches
    for scene, prompt in swatches:
        image = dataset.render(scene)
        assert (image == np.array(dataset.COLORS[prompt], dtype=np.uint8)).all()


def test_autoencoder_images_put_shapes_of_any_size_anywhere() -> None:
    rng = np.random.default_rng(9)
    images = dataset.autoencoder_batch(rng, 64)
    assert images.shape == (64, 3, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Foreground centres spread over the frame (training scenes without a position sit in the middle).
    off_centre = 0
    for image in images:
        pixels = np.round((image.transpose(1, 2, 0) + 1) * 127.5)
        border = pixels[0, 0]
        ys, xs = np.nonzero(np.abs(pixels - border).sum(axis=-1) > 30)
        if len(ys) and max(abs(ys.mean() - 32), abs(xs.mean() - 32)) > 6:
            off_centre += 1
    assert off_centre >= 16
