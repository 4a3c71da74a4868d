"""Request and response shapes of `POST /v1/images/generations` (OpenAI images API + `nvext`)."""

from __future__ import annotations

import json
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from diffusion_worker.errors import invalid_param

MAX_SEED = 2**62
MAX_GUIDANCE_SCALE = 100
# ASCII digits only (`\d` takes any Unicode digit, which int() reads); used with fullmatch.
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")

ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
QUALITY_VALUES: tuple[str, ...] = typing.get_args(Quality)
Style = Literal["vivid", "natural"]
Background = Literal["auto", "opaque", "transparent"]
Moderation = Literal["low", "auto"]
MAX_PARTIAL_IMAGES = 3

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILE_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# The longest side each encoder can write (libwebp: 16383, libjpeg: 65500; PNG: 2^31 - 1); a
# larger one failed in Pillow after the whole generation, as a 500 that clients retried.
MAX_SIDE: dict[str, int] = {"webp": 16383, "jpeg": 65500}


def unicode_text(value: Any) -> Any:
    """A field validator: every string in `value` (or in its list) must be text UTF-8 can encode.
    JSON lets a lone UTF-16 surrogate through (`"\\ud800"`): in a prompt the tokenizer then failed
    inside the pipeline, a 500 counted against the engine (three took a replica out of rotation);
    echoed back (`user`), it failed the response's encoding after the images were made."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "must be Unicode text, without lone UTF-16 surrogates (\\ud800-\\udfff)"
                ) from None
    return value


class NvExt(BaseModel):
    """NVIDIA-style extension fields; unknown ones are rejected so typos do not pass silently.
    Numbers are strict (JSON numbers only, see ImageGenerationRequest)."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = Field(None, description="What the image should not show.")
    num_inference_steps: StrictInt | None = Field(
        None, ge=1, description="Denoising steps; capped by the server's --max-inference-steps."
    )
    guidance_scale: StrictFloat | None = Field(
        None, ge=0, le=MAX_GUIDANCE_SCALE, description="Classifier-free guidance scale."
    )
    seed: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of image 0; image i uses seed + i (seed + n - 1 at most 2^62). Absent: random.",
    )
    annotations: list[str] | None = Field(None, description="Free-form tags; accepted, not used.")

    _unicode_text = field_validator("*", mode="before")(unicode_text)


# nvext field names sent at the top level (as clients written for other servers send them) are
# refused: ignored, a top-level `seed` looked set and was not.
NVEXT_FIELDS: frozenset[str] = frozenset(NvExt.model_fields)


class ImageGenerationRequest(BaseModel):
    """Body of `POST /v1/images/generations`. Unknown top-level fields are ignored with a warning,
    except nvext field names (`seed`, ...), which serving refuses (see NVEXT_FIELDS).

    Integers are strict: lax parsing read "2", true and 2.0 as 2, so a client that sends the wrong
    type got a request it did not mean instead of a 400 (the openai client sends JSON integers)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(..., description="What to draw.")
    model: str | None = Field(None, description="Must equal the served model name when given.")
    n: StrictInt | None = Field(1, ge=1, description="Number of images.")
    size: str | None = Field(
        None, description="WIDTHxHEIGHT (multiples of 8, or of 16 or 32 where the model needs it) or `auto`."
    )
    quality: Quality | None = Field(
        None, description="Sets the step count when nvext.num_inference_steps is absent (see README)."
    )
    response_format: ResponseFormat | None = Field(None, description="`url` (default) or `b64_json`.")
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: StrictInt | None = Field(
        None, ge=0, le=100, description="jpeg/webp quality 0-100 (default 100); ignored for png."
    )
    style: Style | None = Field(None, description="Accepted; has no effect on diffusion models.")
    user: str | None = Field(None, description="End-user id; names the storage folder (sanitised).")
    safety_identifier: str | None = Field(
        None, description="End-user id; takes precedence over `user` for storage paths."
    )
    background: Background | None = Field(None, description="`auto` or `opaque`; `transparent` is refused.")
    moderation: Moderation | None = Field(
        None,
        description="Accepted; either value leaves moderation to the model's own safety checker, "
        "where it ships one (a flagged image: 400 moderation_blocked).",
    )
    # Strict: lax parsing would read "yes", "off" or 1 as a boolean, and a client that means
    # something else by them would get the wrong kind of answer (OpenAI refuses them too).
    stream: StrictBool | None = Field(None, description="Answer with server-sent events (b64_json only).")
    partial_images: StrictInt | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES, description="Previews per image while streaming (0-3)."
    )
    # Known OpenAI fields this server cannot honour: refused by name rather than ignored.
    svg: Any | None = Field(None, description="Not supported (400).")
    frame_count: Any | None = Field(None, description="Not supported (400).")
    frame_duration_ms: Any | None = Field(None, description="Not supported (400).")
    complexity: Any | None = Field(None, description="Not supported (400).")
    nvext: NvExt | None = None

    @property
    def effective_user(self) -> str | None:
        """`safety_identifier` when non-empty, else `user`."""
        return self.safety_identifier or self.user or None

    _unicode_text = field_validator("*", mode="before")(unicode_text)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class ImageObject(BaseModel):
    """One generated image: exactly one of `url` and `b64_json` is set."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class NvExtResponse(BaseModel):
    """Extension fields of the response."""

    seeds: list[int] = Field(..., description="The seed of each image, in order; reuse one to reproduce it.")


class ImagesResponse(BaseModel):
    """Body of a successful generation."""

    created: int
    data: list[ImageObject]
    size: str
    quality: str
    output_format: OutputFormat
    background: Literal["opaque"]
    safety_identifier: str | None
    nvext: NvExtResponse


class ErrorDetail(BaseModel):
    """OpenAI error detail."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI error object, the body of every 4xx/5xx."""

    error: ErrorDetail


def parse_size(
    value: str, *, max_pixels: int, multiple: int = 8, model: str | None = None
) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), both positive multiples of `multiple` (what `model`, a
    pipeline class, needs) within `max_pixels`. Surrounding spaces are let through; any other
    character, a newline or a tab included, is refused."""
    match = SIZE_PATTERN.fullmatch(value.strip(" "))
    if not match:
        raise invalid_param("size", f"`size` must be WIDTHxHEIGHT (e.g. 1024x1024) or 'auto', got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        needs = f" for {model}" if model else ""
        raise invalid_param(
            "size", f"`size` must be WIDTHxHEIGHT with both multiples of {multiple}{needs}, got {value!r}"
        )
    if width * height > max_pixels:
        raise invalid_param(
            "size",
            f"`size` {value!r} has {width * height} pixels; this server allows at most {max_pixels}",
            code="size_too_large",
        )
    return width, height


def check_size_for_format(size: tuple[int, int], output_format: str) -> None:
    """400 naming `size` when `output_format`'s encoder cannot write an image that large."""
    limit = MAX_SIDE.get(output_format)
    if limit is not None and max(size) > limit:
        raise invalid_param(
            "size",
            f"`size` {format_size(size)!r} is too large for `output_format` {output_format!r}: "
            f"{output_format} images are at most {limit} pixels a side",
            code="size_too_large",
        )


def format_size(size: tuple[int, int]) -> str:
    """(width, height) -> `WIDTHxHEIGHT`."""
    return f"{size[0]}x{size[1]}"


def image_object(response_format: ResponseFormat, value: str) -> dict[str, Any]:
    """One entry of `data`: the url or the base64 PNG, plus `revised_prompt: null`."""
    return {response_format: value, "revised_prompt": None}


def render_json(content: Any) -> bytes:
    """`content` as JSONResponse renders it (compact UTF-8 JSON, the same bytes), built member by
    member: json.dumps holds the GIL for a whole call, so one call on a response of ten 2048x2048
    images (160 MB) held it for 0.44 s; a thread running this lets the event loop in between."""
    if isinstance(content, dict) and all(isinstance(key, str) for key in content):
        members = [_dumps(key) + b":" + render_json(value) for key, value in content.items()]
        return b"{" + b",".join(members) + b"}"
    if isinstance(content, list | tuple):
        return b"[" + b",".join(render_json(item) for item in content) + b"]"
    return _dumps(content)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
