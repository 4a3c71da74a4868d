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
