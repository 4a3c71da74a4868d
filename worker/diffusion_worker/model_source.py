"""Turns `--model` (Hub id, local directory, builtin:NAME, s3:// or gs:// URI) into what
`DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


class ModelSourceError(Exception):
    """`--model` names something that cannot be loaded; the message says why."""


def _build_tiny_sd(directory: Path) -> Path:
    from diffusion_worker.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(directory)


BUILTIN_MODELS: dict[str, Callable[[Path], Path]] = {"tiny-sd": _build_tiny_sd}


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


def _builtin_model_dir(name: str, cache_dir: Path) -> Path:
    builder = BUILTIN_MODELS.get(name)
    if builder is None:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in sorted(BUILTIN_MODELS))
        raise ModelSourceError(f"--model {BUILTIN_PREFIX}{name}: unknown built-in model; known: {known}")
    directory = cache_dir / "builtin" / name
    if not (directory / "model_index.json").is_file():
        log.info("building built-in model %s into %s", name, directory)
        if directory.exists():
            shutil.rmtree(directory)
        builder(directory)
    return directory


def _download_remote_model(uri: str, cache_dir: Path) -> Path:
    import fsspec

    local = cache_dir / "remote" / re.sub(r"[^A-Za-z0-9._-]+", "_", uri)
    if (local / "model_index.json").is_file():
        log.info("using cached copy of %s at %s", uri, local)
        return local
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{root.rstrip('/')}/model_index.json"):
        raise ModelSourceError(f"--model {uri!r}: no diffusers pipeline there (model_index.json not found)")
    staging = local.with_name(local.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("downloading %s to %s", uri, local)
    fs.get(root.rstrip("/") + "/", str(staging) + "/", recursive=True)
    staging.replace(local)
    return local
