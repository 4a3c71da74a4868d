"""Storage paths, sanitising and local file lookups (real local file system)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from diffusion_worker import storage
from diffusion_worker.storage import (
    MAX_USER_LENGTH,
    USER_HASH_LENGTH,
    ImageStore,
    StorageError,
    Upload,
    image_key,
    sanitize_user,
)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, "anonymous"),
        ("", "anonymous"),
        ("alice", "alice"),
        ("a.b-c_d", "a.b-c_d"),
        ("x" * 64, "x" * 64),
    ],
)
def test_a_safe_user_id_is_its_own_folder(user: str | None, expected: str) -> None:
    assert sanitize_user(user) == expected


@pytest.mark.parametrize(
    ("user", "readable"),
    [
        ("..", ""),
        ("../../etc", "_.._etc"),
        ("/abs", "_abs"),
        ("x\\y", "x_y"),
        ("a/b", "a_b"),
        ("\x00", "_"),
        ("ünï", "_n_"),
        ("x" * 100, "x" * 51),
    ],
)
def test_an_unsafe_user_id_gives_one_safe_segment_ending_in_its_hash(user: str, readable: str) -> None:
    segment = sanitize_user(user)
    digest = hashlib.sha256(user.encode()).hexdigest()[:USER_HASH_LENGTH]
    assert segment == (f"{readable}-{digest}" if readable else digest)
    assert "/" not in segment and segment not in (".", "..") and not segment.startswith(".")
    assert len(segment) <= MAX_USER_LENGTH and sanitize_user(segment) == segment


@pytest.mark.parametrize(
    "users",
    [
        ("alice@example.com", "alice_example.com", "alice example.com"),
        ("x" * 64, "x" * 64 + "a", "x" * 64 + "b"),
        ("..", "...", "_"),
    ],
)
def test_user_ids_that_sanitise_alike_get_folders_of_their_own(users: tuple[str, ...]) -> None:
    """One folder per id: per-user deletion, lifecycle rules and ACLs must not mix users."""
    assert len({sanitize_user(user) for user in users}) == len(users)


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


class FlakyLocalFileSystem(LocalFileSystem):
    """The real local file system, whose first `failures` writes raise `error` (an NFS hiccup)."""

    def __init__(self, error: OSError, failures: int) -> None:
        super().__init__(skip_instance_cache=True)
        self.error, self.failures, self.attempts = error, failures, 0

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        super().pipe_file(path, value, mode, **kwargs)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "WRITE_RETRY_DELAYS", (0.0, 0.0))


@pytest.mark.usefixtures("quick_retries")
def test_a_write_that_fails_transiently_is_retried_and_each_retry_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_at(tmp_path)
    store.fs = flaky = FlakyLocalFileSystem(OSError(errno.EIO, "Input/output error"), failures=2)
    with caplog.at_level(logging.WARNING, logger="diffusion_worker.storage"):
        urls = store.write_and_sign([("users/u/generations/r/0.png", b"png", "image/png")], "http://h/")
    assert urls == ["http://h/v1/images/files/users/u/generations/r/0.png"]
    assert (tmp_path / "users/u/generations/r/0.png").read_bytes() == b"png"
    assert flaky.attempts == 3
    retries = [record.getMessage() for record in caplog.records]
    assert len(retries) == 2 and "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    assert all("Input/output error" in message and "/u/" not in message for message in retries)


@pytest.mark.usefixtures("quick_retries")
def test_a_write_that_keeps_failing_transiently_gives_up_after_the_retries(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store.fs = flaky = FlakyLocalFileSystem(OSError(errno.ESTALE, "Stale file handle"), failures=10)
    with pytest.raises(StorageError, match="Stale file handle"):
        store.write_and_sign([("r/0.png", b"png", "image/png")], "http://h/")
    assert flaky.attempts == 1 + len(storage.WRITE_RETRY_DELAYS)


@pytest.mark.usefixtures("quick_retries")
@pytest.mark.parametrize(
    "error", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.ENOSPC, "No space left")]
)
def test_a_write_that_cannot_succeed_is_not_retried(tmp_path: Path, error: OSError) -> None:
    store = store_at(tmp_path)
    store.fs = flaky = FlakyLocalFileSystem(error, failures=10)
    with pytest.raises(StorageError):
        store.write_and_sign([("r/0.png", b"png", "image/png")], "http://h/")
    assert flaky.attempts == 1


class UnreachableS3FileSystem(MemoryFileSystem):
    """In-memory storage calling itself s3 whose writes fail as an endpoint out of reach would."""

    protocol = ("s3", "memory")
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    attempts = 0

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        type(self).attempts += 1
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


@pytest.mark.usefixtures("quick_retries")
def test_writes_to_s3_are_left_to_botocores_own_retries() -> None:
    store = ImageStore("memory://bucket/prefix", public_base_url="https://cdn.example", url_expiry_seconds=60)
    store.fs, store.protocol = UnreachableS3FileSystem(), "s3"
    with pytest.raises(StorageError):
        store.write_and_sign([("r/0.png", b"png", "image/png")], "http://h/")
    assert UnreachableS3FileSystem.attempts == 1


FULL_DISK_WRITE = """
import resource, signal, sys
from diffusion_worker.storage import ImageStore, StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
store = ImageStore(sys.argv[1], public_base_url=None, url_expiry_seconds=60)
try:
    store.write_and_sign([("users/u/generations/r1/0.png", b"x" * 10_000, "image/png")], "http://h/")
except StorageError as exc:
    print("StorageError:", exc)
"""


def test_a_write_that_fails_part_way_leaves_no_truncated_image(tmp_path: Path) -> None:
    """A real short write: the process may write 4 KiB per file (RLIMIT_FSIZE), the image is 10 KB.
    Before, the truncated file stayed, and the worker served it (200) on its files route."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITE, tmp_path.as_uri()], capture_output=True, text=True, timeout=60
    )
    assert "StorageError:" in result.stdout and "File too large" in result.stdout, (
        result.stdout + result.stderr
    )
    assert not (tmp_path / "users" / "u" / "generations" / "r1").exists()


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


def expiring_store(root: Path, *, remove_expired: bool = True) -> ImageStore:
    return ImageStore(
        f"file://{root}", public_base_url=None, url_expiry_seconds=60, remove_expired=remove_expired
    )


def stored(store: ImageStore, key: str, age_seconds: float) -> Path:
    """Write `key` and make it (and its request folder) `age_seconds` old."""
    store.write_and_sign([(key, b"png", "image/png")], "http://h/")
    path = Path(store.root) / key
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    os.utime(path.parent, (then, then))
    return path


def test_images_whose_urls_expired_are_removed_with_their_request_folder(tmp_path: Path) -> None:
    store = expiring_store(tmp_path / "images")
    old = [stored(store, f"users/a/generations/old/{i}.png", 61) for i in range(2)]
    fresh = stored(store, "users/a/generations/new/0.png", 30)
    assert store.local_file("users/a/generations/old/0.png") is None, "an expired URL is a 404 at once"
    assert store.local_file("users/a/generations/new/0.png") == fresh
    assert store.remove_expired() == 2
    assert not any(path.exists() for path in old) and not old[0].parent.exists()
    assert fresh.exists()
    assert (tmp_path / "images" / "users" / "a" / "generations").is_dir(), "folders above a request's stay"


def test_a_new_empty_request_folder_is_left_for_the_upload_about_to_write_into_it(tmp_path: Path) -> None:
    store = expiring_store(tmp_path / "images")
    just_made = tmp_path / "images" / "users" / "a" / "generations" / "r"
    just_made.mkdir(parents=True)
    assert store.remove_expired() == 0
    assert just_made.is_dir()


def test_an_expired_link_is_removed_and_its_target_is_not(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    store = expiring_store(tmp_path / "images")
    folder = tmp_path / "images" / "users" / "a" / "generations" / "r"
    folder.mkdir(parents=True)
    link = folder / "0.png"
    link.symlink_to(outside)
    then = time.time() - 61
    os.utime(link, (then, then), follow_symlinks=False)
    assert store.remove_expired() == 1
    assert not link.is_symlink() and outside.read_bytes() == b"not ours"


def test_images_in_a_storage_location_the_user_chose_are_kept(tmp_path: Path) -> None:
    """Only the worker's default local storage is its own to clean; elsewhere retention is the user's."""
    kept = expiring_store(tmp_path / "images", remove_expired=False)
    path = stored(kept, "users/a/generations/old/0.png", 3600)
    assert kept.remove_expired() == 0 and path.exists()
    assert kept.local_file("users/a/generations/old/0.png") == path
    behind_a_cdn = ImageStore(
        f"file://{tmp_path}/cdn", public_base_url="https://cdn/", url_expiry_seconds=60, remove_expired=True
    )
    assert not behind_a_cdn.removes_expired, "URLs through a public base URL do not expire"
