"""Turns `--model` (Hub id, local directory, builtin:NAME, s3:// or gs:// URI) into what
`DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
# Optional file in a model directory: request defaults the model was tuned for, e.g.
# {"num_inference_steps": 20, "guidance_scale": 5.0}. Worker flags still win over it.
WORKER_DEFAULTS_FILE = "worker_defaults.json"


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
