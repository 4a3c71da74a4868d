"""PIL image -> PNG / JPEG / WEBP bytes."""

from __future__ import annotations

import io
from typing import Any

DEFAULT_COMPRESSION = 100


def encode_image(image: Any, output_format: str, compression: int | None = None) -> bytes:
    """Encode one image; `compression` (0-100, default 100) is the jpeg/webp quality, unused for png.

    PNG output carries no timestamp, so the same pixels always give the same bytes.
    """
    buffer = io.BytesIO()
    quality = DEFAULT_COMPRESSION if compression is None else compression
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, lossless=quality == 100)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue()
