"""Storage paths, sanitising and local file lookups (real local file system)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_worker.storage import ImageStore, StorageError, image_key, sanitize_user


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


def test_put_all_writes_and_local_file_finds(tmp_path: Path) -> None:
    store = store_at(tmp_path / "images")
    store.put_all([("users/a/generations/r/0.png", b"png-bytes", "image/png")])
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
        store.put_all([("r/0.png", b"zero", "image/png"), ("r/1.png", b"one", "image/png")])
    assert not (tmp_path / "r" / "0.png").exists()
