"""Writes images through fsspec under --storage-url and says where clients can fetch them."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
MAX_USER_LENGTH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
PRESIGNING_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}


class StorageError(Exception):
    """Images could not be written; nothing of the request is left behind."""


def sanitize_user(user: str | None) -> str:
    """A single safe path segment for `user`: no separators, no dot-only names, bounded length."""
    if not user:
        return ANONYMOUS
    segment = _UNSAFE.sub("_", user).strip(".")[:MAX_USER_LENGTH]
    return segment or ANONYMOUS


def image_key(user: str | None, request_id: str, index: int, extension: str) -> str:
    """Path of one image below the storage root."""
    return f"users/{sanitize_user(user)}/generations/{request_id}/{index}.{extension}"


class ImageStore:
    """fsspec storage for generated images."""

    def __init__(self, storage_url: str, *, public_base_url: str | None, url_expiry_seconds: int) -> None:
        import fsspec

        self.storage_url = storage_url
        self.fs, self.root = fsspec.core.url_to_fs(storage_url)
        self.root = self.root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.url_expiry_seconds = url_expiry_seconds

    @property
    def is_local(self) -> bool:
        """Whether images land on this machine's file system."""
        return self.protocol in ("file", "local")

    @property
    def serves_files(self) -> bool:
        """Whether the worker must serve stored images itself (`GET /v1/images/files/...`)."""
        return self.is_local and self.public_base_url is None

    def put_all(self, items: list[tuple[str, bytes, str]]) -> None:
        """Write every (key, data, content_type); on any failure remove what was written and raise."""
        written: list[str] = []
        try:
            for key, data, content_type in items:
                path = f"{self.root}/{key}"
                if self.is_local:
                    self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(path, data, **self._content_type_options(content_type))
                written.append(path)
        except Exception as exc:
            for path in written:
                try:
                    self.fs.rm_file(path)
                except Exception:
                    log.warning("could not remove %s after a failed write", path)
            raise StorageError(f"could not write images to {self.storage_url}: {type(exc).__name__}") from exc

    def _content_type_options(self, content_type: str) -> dict[str, Any]:
        if self.protocol in ("s3", "s3a"):
            return {"ContentType": content_type}
        if self.protocol in ("gs", "gcs"):
            return {"content_type": content_type}
        return {}

    def url_for(self, key: str, request_base_url: str) -> str:
        """Public base URL + key; else a presigned URL (s3/gs); else the worker's own files route."""
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        if self.protocol in PRESIGNING_PROTOCOLS:
            try:
                return str(self.fs.sign(f"{self.root}/{key}", expiration=self.url_expiry_seconds))
            except Exception as exc:
                raise StorageError(f"could not presign a URL under {self.storage_url}: {exc}") from exc
        if self.serves_files:
            return f"{request_base_url.rstrip('/')}/v1/images/files/{key}"
        return f"{self.storage_url}/{key}"

    def local_file(self, key: str) -> Path | None:
        """The regular file for `key` inside the storage root; None for traversal or links out."""
        if not self.is_local:
            return None
        root = Path(os.path.realpath(self.root))
        candidate = Path(os.path.realpath(root / key))
        if not candidate.is_relative_to(root) or candidate == root or not candidate.is_file():
            return None
        return candidate
