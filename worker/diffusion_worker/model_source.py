"""Turns `--model` (Hub id, local directory, builtin:NAME, s3:// or gs:// URI) into what
`DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec import callbacks as fsspec_callbacks

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
# Optional file in a model directory: request defaults the model was tuned for, e.g.
# {"num_inference_steps": 20, "guidance_scale": 5.0}. Worker flags still win over it.
WORKER_DEFAULTS_FILE = "worker_defaults.json"
# How often a model copy from object storage logs its progress, at most.
PROGRESS_LOG_SECONDS = 30.0


class ModelSourceError(Exception):
    """`--model` names something that cannot be loaded; the message says why."""


def _build_tiny_sd(directory: Path) -> Path:
    from diffusion_worker.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(directory)


def _packaged_shapes() -> Path:
    from diffusion_worker.shapes import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise ModelSourceError(
            f"--model {BUILTIN_PREFIX}shapes: weights missing from {WEIGHTS_DIR}; run `make train-demo-model`"
        )
    return WEIGHTS_DIR


# Built in cache_dir on first use.
BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {"tiny-sd": _build_tiny_sd}
# Shipped inside the package and loaded where they lie (read-only; no copy to go stale).
PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"shapes": _packaged_shapes}


@dataclass(frozen=True)
class ModelLocation:
    """The first argument of from_pretrained, and whether it is a Hub id (revision applies)."""

    name_or_path: str
    from_hub: bool


def resolve_model(model: str, cache_dir: Path) -> ModelLocation:
    """Find or materialise `model` locally where that is possible; Hub ids are left to from_pretrained."""
    if model.startswith(BUILTIN_PREFIX):
        return ModelLocation(str(_builtin_model_dir(model.removeprefix(BUILTIN_PREFIX), cache_dir)), False)
    if model.startswith(REMOTE_SCHEMES):
        return ModelLocation(str(_download_remote_model(model, cache_dir)), False)
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", "./", "../", "~")):
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(
                f"--model {model!r}: no diffusers pipeline there (model_index.json not found)"
            )
        return ModelLocation(str(path), False)
    return ModelLocation(model, True)


def model_defaults(location: ModelLocation) -> dict[str, Any]:
    """Request defaults from the model directory's WORKER_DEFAULTS_FILE; {} when there is none."""
    if location.from_hub:
        return {}
    path = Path(location.name_or_path) / WORKER_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(defaults, dict):
        raise ModelSourceError(f"{path}: must hold a JSON object, got {type(defaults).__name__}")
    return defaults


def _builtin_model_dir(name: str, cache_dir: Path) -> Path:
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None:
        return packaged()
    builder = BUILTIN_MODELS.get(name)
    if builder is None:
        names = sorted([*BUILTIN_MODELS, *PACKAGED_MODELS])
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in names)
        raise ModelSourceError(f"--model {BUILTIN_PREFIX}{name}: unknown built-in model; known: {known}")
    return _materialised(cache_dir / "builtin" / name, builder, f"built-in model {name}")


def _download_remote_model(uri: str, cache_dir: Path) -> Path:
    import fsspec

    local = cache_dir / "remote" / re.sub(r"[^A-Za-z0-9._-]+", "_", uri)
    if _complete(local):
        log.info("using cached copy of %s at %s", uri, local)
        return local
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/model_index.json"):
        raise ModelSourceError(f"--model {uri!r}: no diffusers pipeline there (model_index.json not found)")

    def download(staging: Path) -> None:
        try:
            sizes = [int(info.get("size") or 0) for info in fs.find(root, detail=True).values()]
            progress = _CopyProgress(uri, len(sizes), sum(sizes))
            fs.get(f"{root}/", f"{staging}/", recursive=True, callback=progress)
        except Exception as exc:
            raise ModelSourceError(f"--model {uri!r}: download failed: {type(exc).__name__}: {exc}") from exc
        progress.finished()

    return _materialised(local, download, uri)


def _amount(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


class _CopyProgress(fsspec_callbacks.Callback):  # type: ignore[misc]  # fsspec is untyped
    """Logs a model copy as it goes, at most every PROGRESS_LOG_SECONDS (a big model takes minutes,
    and a silent log looks like a hang): the bytes copied, summed from each file's own callback.
    (fsspec's own count here is of transfers, folders included, so it is not shown.)"""

    def __init__(self, uri: str, files: int, total_bytes: int) -> None:
        super().__init__()
        self.uri = uri
        self.total_bytes = total_bytes
        self.bytes_done = 0
        self.started = self.logged_at = time.monotonic()
        log.info("copying %s: %d files, %s", uri, files, _amount(total_bytes))

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> fsspec_callbacks.Callback:
        return _FileBytes(self)

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.log_now_and_then()

    def log_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self.logged_at >= PROGRESS_LOG_SECONDS:
            self.logged_at = now
            log.info("copying %s: %s of %s", self.uri, _amount(self.bytes_done), _amount(self.total_bytes))

    def finished(self) -> None:
        log.info(
            "copied %s: %s in %.1f s", self.uri, _amount(self.bytes_done), time.monotonic() - self.started
        )


class _FileBytes(fsspec_callbacks.Callback):  # type: ignore[misc]
    """One file's bytes, added to its copy's total as they arrive."""

    def __init__(self, copy: _CopyProgress) -> None:
        super().__init__()
        self.copy = copy
        self.counted = 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.copy.bytes_done += self.value - self.counted
        self.counted = self.value
        self.copy.log_now_and_then()


def _complete(directory: Path) -> bool:
    """True once `directory` holds a pipeline: cached copies are only ever renamed into place whole,
    so a model_index.json there means every file is."""
    return (directory / "model_index.json").is_file()


def _materialised(directory: Path, make: Callable[[Path], Any], what: str) -> Path:
    """`directory`, made by `make(staging)` unless it is already there.

    Processes that share the cache may start together: replicas on one ReadWriteMany volume, the
    ranks of a context-parallel worker. A lock file next to `directory` lets one of them make it
    while the others wait and then find it, so a model is downloaded once. Each maker writes into a
    staging directory of its own and renames it into place, so `directory` appears whole or not at
    all: on a filesystem without locks two processes may both make it, but never mix their files."""
    if _complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(directory, what) as locked:
        if _complete(directory):
            log.info("%s: another process put it at %s", what, directory)
            return directory
        if locked:  # nobody else writes now: staging left by a process that died goes
            for stale in directory.parent.glob(f".{directory.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
        staging = directory.with_name(f".{directory.name}.partial-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        log.info("writing %s to %s", what, directory)
        try:
            make(staging)
            _rename_into_place(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _rename_into_place(staging: Path, directory: Path) -> None:
    if directory.exists() and not _complete(directory):
        shutil.rmtree(directory)  # no model_index.json, so not a copy of ours: left there by hand
    try:
        staging.replace(directory)
    except OSError:
        if not _complete(directory):
            raise
        log.info("%s: another process renamed its copy into place first; keeping that one", directory)


@contextmanager
def _cache_lock(directory: Path, what: str) -> Iterator[bool]:
    """Hold `.NAME.lock` next to `directory`; yields whether the lock is held (False where the
    filesystem refuses locks: then every process makes its own copy, see `_materialised`)."""
    from filelock import FileLock, Timeout

    lock = FileLock(directory.with_name(f".{directory.name}.lock"))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process to finish writing %s to %s", what, directory)
            lock.acquire()
    except (OSError, NotImplementedError) as exc:  # Timeout is an OSError, but was handled above
        log.warning("cannot lock %s (%s): writing %s without a lock", directory, exc, what)
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
