"""Turns `--model` (Hub id, local directory, builtin:NAME, s3:// or gs:// URI) into what
`DiffusionPipeline.from_pretrained` loads, and keeps the cache dir's rules for whoever writes a model
there (this module's built-in models, `remote_model`'s copies): a lock, staging names, fsync."""

from __future__ import annotations

import errno
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

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
# Optional file in a model directory: request defaults the model was tuned for, e.g.
# {"num_inference_steps": 20, "guidance_scale": 5.0}. Worker flags still win over it.
WORKER_DEFAULTS_FILE = "worker_defaults.json"
# A staging file or folder nobody has written to for this long is taken for abandoned, whichever node
# wrote it. A writer touches its file as long as it writes; an hour allows for clocks that differ.
STALE_STAGING_SECONDS = 3600.0
# The writer (host and process id) of a staging name (`staging_name`), and of names made from it
# (the tiny-sd builder's `.NAME.partial-HOST-PID.tmp-XXXX`).
STAGING_WRITER = re.compile(r"\.partial-(?P<host>.+)-\d+(\..*)?$")


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
        from diffusion_worker.remote_model import copy_remote_model

        return ModelLocation(str(copy_remote_model(model, cache_dir)), False)
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


def _complete(directory: Path) -> bool:
    """True once `directory` holds a built model: they are only ever renamed into place whole, so a
    model_index.json there means every file is."""
    return (directory / "model_index.json").is_file()


def _materialised(directory: Path, make: Callable[[Path], Any], what: str) -> Path:
    """`directory`, made by `make(staging)` unless it is already there.

    Processes that share the cache may start together: replicas on one ReadWriteMany volume, the
    ranks of a context-parallel worker. A lock file next to `directory` lets one of them make it
    while the others wait and then find it, so a model is built once. Each maker writes into a
    staging directory of its own, syncs it to disk and renames it into place, so `directory` appears
    whole or not at all: where locks do not exclude every process (refused, or per node on NFS) two
    may both make it, but never mix their files or delete each other's (see `abandoned`)."""
    if _complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(directory, what) as locked:
        if _complete(directory):
            log.info("%s: another process put it at %s", what, directory)
            return directory
        for left in directory.parent.glob(f".{directory.name}.partial-*"):
            if abandoned(left, locked):
                shutil.rmtree(left, ignore_errors=True)
        staging = directory.with_name(staging_name(directory.name))
        shutil.rmtree(staging, ignore_errors=True)
        log.info("writing %s to %s", what, directory)
        try:
            make(staging)
            sync_tree(staging)
            _rename_into_place(staging, directory)
            fsync_path(directory.parent)
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


def staging_name(name: str) -> str:
    """`.NAME.partial-HOST-PID`: where this process writes NAME until it is whole."""
    return f".{name}{staging_suffix()}"


def staging_suffix() -> str:
    """What ends the names of this process's staging files and folders."""
    return f".partial-{socket.gethostname()}-{os.getpid()}"


def is_staging_name(name: str) -> bool:
    """Whether `name` is one `staging_name` gives."""
    return name.startswith(".") and STAGING_WRITER.search(name) is not None


def abandoned(path: Path, locked: bool) -> bool:
    """Whether the writer of staging file or folder `path` (see `staging_name`) is gone: one of this
    host while we hold the lock (it excludes the processes of one host, even where it is per node,
    as on NFS with local locks), or any whose writing stopped STALE_STAGING_SECONDS ago. Holding the
    lock proves nothing of other nodes, so their work in progress is never deleted."""
    found = STAGING_WRITER.search(path.name)
    if found is None:
        return False
    if locked and found["host"] == socket.gethostname():
        return True
    try:
        paths = [path, *path.rglob("*")] if path.is_dir() else [path]
        last_written = max(entry.stat().st_mtime for entry in paths)
    except OSError:  # removed meanwhile, by its writer or its finished rename
        return False
    return time.time() - last_written > STALE_STAGING_SECONDS


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a filesystem that cannot sync folders
            raise
    finally:
        os.close(descriptor)


def sync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, and `root`, before a rename publishes them: after a
    crash the renamed folder must not hold empty or missing files."""
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


@contextmanager
def cache_lock(directory: Path, what: str) -> Iterator[bool]:
    """Hold `.NAME.lock` next to `directory`; yields whether the lock is held (False where the
    filesystem refuses locks: then several processes may write at once, see `_materialised` and
    `remote_model`)."""
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
