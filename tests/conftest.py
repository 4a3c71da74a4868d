"""Fixtures shared by every tier: the tiny model and a real S3 server, each made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.seaweedfs import S3Endpoint, running_seaweedfs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline written with save_pretrained."""
    from diffusion_worker.tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A real SeaweedFS S3 server on loopback."""
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint
