"""A running worker on the tiny model, and the official openai client pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from diffusion_worker.settings import WorkerSettings
from support.worker_server import running_worker

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]


def make_settings(model_dir: Path, tmp_path: Path, **overrides: Any) -> WorkerSettings:
    """Settings for tests: the tiny model, file storage under tmp_path, few default steps."""
    values: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": "tiny-sd",
        "cache_dir": tmp_path / "cache",
        "storage_url": f"file://{tmp_path / 'images'}",
        "default_inference_steps": 2,
        "max_inference_steps": 20,
        "max_images_per_request": 4,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@pytest.fixture(scope="module")
def worker_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One worker shared by a module's tests: file storage, steps capped at 20, n at most 4."""
    with running_worker(make_settings(tiny_model_dir, tmp_path_factory.mktemp("worker"))) as url:
        yield url


@pytest.fixture
def client(worker_url: str) -> openai.OpenAI:
    """The official OpenAI client, unchanged, pointed at the worker."""
    return openai.OpenAI(base_url=f"{worker_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def start_worker(tiny_model_dir: Path, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start extra workers with settings overrides; all stop at the end of the test."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> str:
            loader = overrides.pop("engine_loader", None)
            settings = make_settings(tiny_model_dir, tmp_path, **overrides)
            if loader is None:
                return stack.enter_context(running_worker(settings))
            return stack.enter_context(running_worker(settings, engine_loader=loader))

        yield start
