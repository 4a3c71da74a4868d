"""How `--model builtin:NAME` and a model directory's worker_defaults.json are resolved."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from diffusion_worker.engine import ModelInfo, with_model_defaults
from diffusion_worker.model_source import (
    BUILTIN_MODELS,
    STALE_STAGING_SECONDS,
    WORKER_DEFAULTS_FILE,
    ModelLocation,
    ModelSourceError,
    model_defaults,
    resolve_model,
)
from diffusion_worker.settings import DEFAULT_MODEL
from diffusion_worker.shapes import WEIGHTS_DIR

INFO = ModelInfo(
    pipeline_class="StableDiffusionPipeline",
    default_size=(64, 64),
    default_steps=50,
    default_guidance_scale=7.5,
    supports_negative_prompt=True,
    supports_guidance_scale=True,
)


def test_default_model_is_the_packaged_shapes_model() -> None:
    assert DEFAULT_MODEL == "builtin:shapes"


def test_builtin_shapes_loads_in_place_from_the_package(tmp_path: Path) -> None:
    location = resolve_model("builtin:shapes", tmp_path)
    assert location == ModelLocation(str(WEIGHTS_DIR), False)
    assert (WEIGHTS_DIR / "model_index.json").is_file()
    assert not (tmp_path / "builtin").exists(), "nothing is copied into the cache dir"


def test_unknown_builtin_lists_packaged_and_built_models(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"builtin:shapes, builtin:tiny-sd"):
        resolve_model("builtin:nope", tmp_path)


def test_model_defaults_come_from_the_model_directory(tmp_path: Path) -> None:
    location = ModelLocation(str(tmp_path), False)
    assert model_defaults(location) == {}
    (tmp_path / WORKER_DEFAULTS_FILE).write_text('{"num_inference_steps": 20, "guidance_scale": 5}')
    assert model_defaults(location) == {"num_inference_steps": 20, "guidance_scale": 5}
    assert model_defaults(ModelLocation("org/model", True)) == {}


def test_unreadable_model_defaults_name_the_file(tmp_path: Path) -> None:
    (tmp_path / WORKER_DEFAULTS_FILE).write_text("[1, 2]")
    with pytest.raises(ModelSourceError, match=WORKER_DEFAULTS_FILE):
        model_defaults(ModelLocation(str(tmp_path), False))


def test_model_defaults_replace_the_pipeline_signature_defaults() -> None:
    info = with_model_defaults(INFO, {"num_inference_steps": 20, "guidance_scale": 5})
    assert (info.default_steps, info.default_guidance_scale) == (20, 5.0)
    assert with_model_defaults(INFO, {}) == INFO


def test_shapes_weights_ship_defaults_and_stay_small() -> None:
    assert model_defaults(ModelLocation(str(WEIGHTS_DIR), False))["num_inference_steps"] <= 25
    size = sum(path.stat().st_size for path in WEIGHTS_DIR.rglob("*") if path.is_file())
    assert size <= 20 * 1024 * 1024


def test_where_locks_are_refused_each_process_writes_its_own_copy_and_the_first_rename_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No filesystem here refuses locks, so FileLock.acquire is made to fail as one does (ENOLCK),
    and the other process is played by the builder itself, which puts a complete copy in place
    while ours is being written."""
    import filelock

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    target = tmp_path / "builtin" / "fake"

    def build_while_another_process_finishes_first(staging: Path) -> Path:
        staging.mkdir(parents=True)
        (staging / "model_index.json").write_text('{"copy": "ours"}')
        target.mkdir(parents=True)
        (target / "model_index.json").write_text('{"copy": "theirs"}')
        return staging

    monkeypatch.setitem(BUILTIN_MODELS, "fake", build_while_another_process_finishes_first)
    caplog.set_level(logging.INFO)
    assert resolve_model("builtin:fake", tmp_path) == ModelLocation(str(target), False)
    assert json.loads((target / "model_index.json").read_text()) == {"copy": "theirs"}
    assert [path.name for path in (tmp_path / "builtin").iterdir() if not path.name.endswith(".lock")] == [
        "fake"
    ], "our staging copy is gone"
    assert "writing built-in model fake without a lock" in caplog.text


def test_a_staging_folder_another_node_may_still_be_writing_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS with per-node locks (nolock, local_lock=all) pods on two nodes both hold the lock, so
    holding it proves nothing about the other node. Before, the holder deleted every other staging
    folder, the other node's build in progress included. Now it deletes what this host left (the
    lock does exclude processes here) and what nobody has touched for STALE_STAGING_SECONDS."""
    target = tmp_path / "builtin" / "fake"
    target.parent.mkdir(parents=True)

    def staging_folder(writer: str, age_seconds: float) -> Path:
        folder = target.with_name(f".fake.partial-{writer}")
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
        touched = time.time() - age_seconds
        for path in (folder / "model_index.json", folder):
            os.utime(path, (touched, touched))
        return folder

    other_node_writing = staging_folder("other-node-12", age_seconds=60)
    other_node_gone = staging_folder("gone-node-12", age_seconds=STALE_STAGING_SECONDS + 60)
    this_host_dead = staging_folder(f"{socket.gethostname()}-999999", age_seconds=60)

    def build(staging: Path) -> Path:
        staging.mkdir(parents=True)
        (staging / "model_index.json").write_text('{"copy": "ours"}')
        return staging

    monkeypatch.setitem(BUILTIN_MODELS, "fake", build)
    assert resolve_model("builtin:fake", tmp_path) == ModelLocation(str(target), False)
    assert other_node_writing.exists()
    assert not other_node_gone.exists()
    assert not this_host_dead.exists()
