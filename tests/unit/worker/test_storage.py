"""Storage paths, sanitising and local file lookups (real local file system)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from diffusion_worker.storage import ImageStore, StorageError, Upload, image_key, sanitize_user


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, "anonymous"),
        ("", "anonymous"),
        ("alice", "alice"),
        ("a.b-c_d", "a.b-c_d"),
        ("..", "anonymous"),
        ("../../etc", "_.._etc"),
        ("/abs", "_abs"),
        ("x\\y", "x_y"),
        ("a/b", "a_b"),
        ("\x00", "_"),
        ("ünï", "_n_"),
        ("x" * 100, "x" * 64),
    ],
)
def test_sanitize_user_gives_one_safe_segment(user: str | None, expected: str) -> None:
    segment = sanitize_user(user)
    assert segment == expected
    assert "/" not in segment and segment not in (".", "..") and not segment.startswith(".")


def test_image_key_layout() -> None:
    assert image_key("bob", "r1", 2, "png") == "users/bob/generations/r1/2.png"


def store_at(root: Path, public_base_url: str | None = None) -> ImageStore:
    return ImageStore(f"file://{root}", public_base_url=public_base_url, url_expiry_seconds=60)


def test_written_images_are_found_by_local_file(tmp_path: Path) -> None:
    store = store_at(tmp_path / "images")
    store.write_and_sign([("users/a/generations/r/0.png", b"png-bytes", "image/png")], "http://h:1/")
    found = store.local_file("users/a/generations/r/0.png")
    assert found is not None and found.read_bytes() == b"png-bytes"
    assert (
        store.url_for("users/a/generations/r/0.png", "http://h:1/")
        == "http://h:1/v1/images/files/users/a/generations/r/0.png"
    )


def test_public_base_url_wins_and_disables_the_files_route(tmp_path: Path) -> None:
    store = store_at(tmp_path, public_base_url="https://cdn.example/img/")
    assert store.url_for("users/a/x.png", "http://h/") == "https://cdn.example/img/users/a/x.png"
    assert not store.serves_files


def test_local_file_refuses_traversal_and_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    (root / "link.png").symlink_to(tmp_path / "secret.txt")
    (root / "sub").mkdir()
    store = store_at(root)
    for key in ("../secret.txt", "sub/../../secret.txt", "link.png", "sub", "", "/etc/passwd"):
        assert store.local_file(key) is None, key


def test_failed_write_removes_what_was_written(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "1.png").mkdir()  # a directory where image 1 must go: its write fails for real
    with pytest.raises(StorageError):
        store.write_and_sign(
            [("r/0.png", b"zero", "image/png"), ("r/1.png", b"one", "image/png")], "http://h/"
        )
    assert not (tmp_path / "r" / "0.png").exists()


class UnsignableMemoryFileSystem(MemoryFileSystem):
    """fsspec's in-memory file system, calling itself s3 (so the store presigns), that cannot presign."""

    protocol = ("s3", "memory")
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    def sign(self, path: str, expiration: int = 100, **kwargs: Any) -> str:
        raise PermissionError("no credentials for bucket secret-bucket")


def test_failed_presign_removes_what_was_written() -> None:
    store = ImageStore("memory://secret-bucket/prefix", public_base_url=None, url_expiry_seconds=60)
    store.fs, store.protocol = UnsignableMemoryFileSystem(), "s3"
    items = [("r/0.png", b"zero", "image/png"), ("r/1.png", b"one", "image/png")]
    with pytest.raises(StorageError) as caught:
        asyncio.run(store.publish(items, "http://h/"))
    assert isinstance(caught.value.__cause__, PermissionError)
    assert UnsignableMemoryFileSystem.store == {}


def test_publish_writes_and_returns_the_urls(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    urls = asyncio.run(store.publish([("r/0.png", b"zero", "image/png")], "http://h/"))
    assert urls == ["http://h/v1/images/files/r/0.png"]
    assert (tmp_path / "r" / "0.png").read_bytes() == b"zero"


def test_an_upload_given_up_on_while_writing_removes_what_it_wrote(tmp_path: Path) -> None:
    """The request gives up (timeout) while its write is under way; the thread, once done, cleans up."""
    store = store_at(tmp_path)
    upload = Upload()
    assert upload.abandon()
    with pytest.raises(StorageError):
        store.write_and_sign([("r/0.png", b"zero", "image/png")], "http://h/", upload)
    assert not (tmp_path / "r" / "0.png").exists()


def test_an_upload_that_finished_first_cannot_be_given_up_on() -> None:
    upload = Upload()
    assert upload.finish()
    assert not upload.abandon()
