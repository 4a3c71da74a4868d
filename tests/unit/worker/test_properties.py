"""Property tests (hypothesis) for the parsing and path rules that stand between clients and disk."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusion_worker.errors import APIError
from diffusion_worker.protocol import ImageGenerationRequest, format_size, parse_size
from diffusion_worker.storage import image_key, sanitize_user

MAX_PIXELS = 2048 * 2048


@given(st.text(max_size=300))
def test_any_user_becomes_one_safe_segment(user: str) -> None:
    segment = sanitize_user(user)
    assert segment and "/" not in segment and "\\" not in segment and "\x00" not in segment
    assert not segment.startswith(".")
    assert len(segment) <= 64
    assert sanitize_user(segment) == segment


@given(st.text(max_size=100), st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.integers(0, 127))
def test_image_keys_never_leave_the_users_prefix(user: str, request_id: str, index: int) -> None:
    key = image_key(user, request_id, index, "png")
    assert posixpath.normpath(key) == key
    assert key.startswith("users/") and key.count("/") == 4


@given(st.integers(1, 512), st.integers(1, 512))
def test_valid_sizes_round_trip(width_units: int, height_units: int) -> None:
    width, height = width_units * 8, height_units * 8
    text = f"{width}x{height}"
    if width * height > MAX_PIXELS:
        with pytest.raises(APIError):
            parse_size(text, max_pixels=MAX_PIXELS)
    else:
        assert format_size(parse_size(text, max_pixels=MAX_PIXELS)) == text


@given(st.text(max_size=20))
def test_size_parsing_accepts_or_names_the_parameter(text: str) -> None:
    try:
        width, height = parse_size(text, max_pixels=MAX_PIXELS)
    except APIError as exc:
        assert exc.status_code == 400 and exc.param == "size"
    else:
        assert width % 8 == 0 and height % 8 == 0 and width * height <= MAX_PIXELS


requests = st.builds(
    ImageGenerationRequest,
    prompt=st.text(min_size=1, max_size=50).filter(str.strip),
    n=st.integers(1, 10),
    size=st.one_of(st.none(), st.just("auto"), st.just("64x64")),
    quality=st.sampled_from([None, "low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]),
    response_format=st.sampled_from([None, "url", "b64_json"]),
    output_format=st.sampled_from([None, "png", "jpeg", "webp"]),
    user=st.one_of(st.none(), st.text(max_size=20)),
)


@given(requests)
def test_requests_round_trip_through_json(request: ImageGenerationRequest) -> None:
    again = ImageGenerationRequest.model_validate_json(request.model_dump_json(exclude_none=True))
    assert again.model_dump(exclude_none=True) == request.model_dump(exclude_none=True)


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=6),
    st.integers(0, 40),
)
def test_an_out_of_memory_split_keeps_every_image_once_and_in_order(
    pieces: list[tuple[int, int]], cut: int
) -> None:
    """split_slices (the scheduler's halving of a batch that ran out of memory) on slices of
    distinct jobs: the two parts hold exactly the batch's images, in order, `cut` in the first."""
    from diffusion_worker.scheduler import _Slice, split_slices

    jobs = [object() for _ in pieces]
    slices = [_Slice(job, start, start + size) for job, (start, size) in zip(jobs, pieces, strict=True)]

    def images(parts: list[_Slice]) -> list[tuple[int, int]]:
        return [(id(part.job), index) for part in parts for index in range(part.start, part.stop)]

    total = sum(size for _, size in pieces)
    first, rest = split_slices(slices, min(cut, total))
    assert len(images(first)) == min(cut, total)
    assert images(first) + images(rest) == images(slices)
    assert all(part.stop > part.start for part in first + rest), "no empty slices"
