"""Request parsing and size validation."""

from __future__ import annotations

import pytest
from fastapi.responses import JSONResponse
from openai.types.image_generate_params import ImageGenerateParamsBase
from pydantic import ValidationError

from diffusion_worker.errors import APIError
from diffusion_worker.protocol import (
    ImageGenerationRequest,
    format_size,
    image_object,
    parse_size,
    render_json,
)


@pytest.mark.parametrize(
    ("text", "expected"), [("64x64", (64, 64)), ("1024x768", (1024, 768)), (" 8x16 ", (8, 16))]
)
def test_parse_size_accepts_multiples_of_8(text: str, expected: tuple[int, int]) -> None:
    assert parse_size(text, max_pixels=2048 * 2048) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1000x7", "multiples of 8"),
        ("0x64", "multiples of 8"),
        ("64", "WIDTHxHEIGHT"),
        ("64X64", "WIDTHxHEIGHT"),
        ("-8x8", "WIDTHxHEIGHT"),
        ("8x8x8", "WIDTHxHEIGHT"),
        ("", "WIDTHxHEIGHT"),
    ],
)
def test_parse_size_rejects_bad_values_naming_size_and_value(text: str, needle: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_size(text, max_pixels=2048 * 2048)
    assert caught.value.status_code == 400
    assert caught.value.param == "size"
    assert needle in caught.value.message and repr(text) in caught.value.message


def test_parse_size_enforces_max_pixels() -> None:
    with pytest.raises(APIError) as caught:
        parse_size("1024x1024", max_pixels=1024 * 1023)
    assert caught.value.code == "size_too_large" and "1048576" in caught.value.message


def test_format_size_round_trips() -> None:
    assert format_size(parse_size("640x480", max_pixels=10**7)) == "640x480"


def test_request_defaults_and_unknown_top_level_fields_are_kept_aside() -> None:
    request = ImageGenerationRequest.model_validate({"prompt": "p", "future_field": 1})
    assert request.n == 1 and request.response_format is None and request.nvext is None
    assert request.model_extra == {"future_field": 1}


def test_unknown_nvext_field_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate({"prompt": "p", "nvext": {"num_steps": 3}})
    assert caught.value.errors()[0]["loc"] == ("nvext", "num_steps")


@pytest.mark.parametrize("prompt", ["", "  ", "\n\t"])
def test_blank_prompt_is_rejected(prompt: str) -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"prompt": prompt})


@pytest.mark.parametrize("value", ["yes", "true", 1, "off"])
def test_stream_takes_only_a_json_boolean(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate({"prompt": "p", "stream": value})
    assert caught.value.errors()[0]["loc"] == ("stream",)
    assert ImageGenerationRequest.model_validate({"prompt": "p", "stream": False}).stream is False


def test_seed_zero_is_kept() -> None:
    request = ImageGenerationRequest.model_validate({"prompt": "p", "nvext": {"seed": 0}})
    assert request.nvext is not None and request.nvext.seed == 0


def test_image_object_has_revised_prompt_null() -> None:
    assert image_object("url", "http://x/0.png") == {"url": "http://x/0.png", "revised_prompt": None}


def test_every_parameter_of_the_openai_client_is_known() -> None:
    """A parameter the official client sends but the model does not declare would be ignored with a
    warning; each must be served or refused by name (a new client release that adds one fails here)."""
    assert set(ImageGenerateParamsBase.__annotations__) <= set(ImageGenerationRequest.model_fields)


def test_parse_size_names_the_multiple_a_model_needs() -> None:
    assert parse_size("80x48", max_pixels=2048 * 2048, multiple=16, model="FluxPipeline") == (80, 48)
    with pytest.raises(APIError) as caught:
        parse_size("72x72", max_pixels=2048 * 2048, multiple=16, model="FluxPipeline")
    assert caught.value.param == "size" and "multiples of 16 for FluxPipeline" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"n": "2"}, ("n",)),
        ({"n": True}, ("n",)),
        ({"n": 2.0}, ("n",)),
        ({"output_compression": "80"}, ("output_compression",)),
        ({"partial_images": True}, ("partial_images",)),
        ({"nvext": {"seed": True}}, ("nvext", "seed")),
        ({"nvext": {"seed": "7"}}, ("nvext", "seed")),
        ({"nvext": {"num_inference_steps": "4"}}, ("nvext", "num_inference_steps")),
        ({"nvext": {"guidance_scale": "7.5"}}, ("nvext", "guidance_scale")),
        ({"nvext": {"guidance_scale": True}}, ("nvext", "guidance_scale")),
    ],
)
def test_counts_and_seeds_take_only_json_numbers(fields: dict[str, object], loc: tuple[str, ...]) -> None:
    """Before, lax parsing read "2", true and 2.0 as integers: a client bug passed as a request."""
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate({"prompt": "p", **fields})
    assert caught.value.errors()[0]["loc"] == loc


def test_json_numbers_as_the_openai_client_sends_them_are_accepted() -> None:
    request = ImageGenerationRequest.model_validate_json(
        '{"prompt": "p", "n": 2, "output_compression": 80, "partial_images": 1,'
        ' "nvext": {"seed": 7, "num_inference_steps": 4, "guidance_scale": 7}}'
    )
    assert (request.n, request.output_compression, request.partial_images) == (2, 80, 1)
    nvext = request.nvext
    assert nvext is not None
    assert (nvext.seed, nvext.num_inference_steps, nvext.guidance_scale) == (7, 4, 7.0)


# Arabic-Indic and fullwidth "64x64", then ASCII with a newline or a tab around it.
@pytest.mark.parametrize(
    "text", ["\u0666\u0664x\u0666\u0664", "\uff16\uff14x\uff16\uff14", "64x64\n", "64x64\n\n", "\t64x64"]
)
def test_parse_size_takes_only_ascii_digits_and_nothing_after(text: str) -> None:
    """`\\d` matched any Unicode digit (int() reads them) and `$` matched before a final newline."""
    with pytest.raises(APIError) as caught:
        parse_size(text, max_pixels=2048 * 2048)
    assert caught.value.param == "size" and "WIDTHxHEIGHT" in caught.value.message


@pytest.mark.parametrize(
    "content",
    [
        {
            "created": 1,
            "data": [{"b64_json": "iVBORw0KGgo+/=", "revised_prompt": None}],
            "nvext": {"seeds": [7, 8]},
        },
        {"safety_identifier": 'ü "quoted"\n', "n": 1.5, "empty": {}, "none": [], "flag": True},
    ],
)
def test_render_json_gives_the_bytes_jsonresponse_would(content: dict[str, object]) -> None:
    assert render_json(content) == JSONResponse(content).body
