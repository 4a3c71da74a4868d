"""Reliability scenarios (issue 6): each runs a bounded version in CI and a longer one under
`make soak` (RELIABILITY_SCALE=soak), and records its figures; RELIABILITY_REPORT=path writes them
as JSON at the end of the session (docs/reliability.md quotes the last soak run)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.reliability import Figures

SCALES = ("ci", "soak")


@pytest.fixture(scope="session")
def scale() -> str:
    """`ci` (bounded, the default) or `soak` (longer runs), from RELIABILITY_SCALE."""
    value = os.environ.get("RELIABILITY_SCALE", "ci")
    if value not in SCALES:
        raise pytest.UsageError(f"RELIABILITY_SCALE must be one of {SCALES}, got {value!r}")
    return value


@pytest.fixture(scope="session")
def figures(scale: str) -> Iterator[Figures]:
    """The session's figures; written to $RELIABILITY_REPORT (if set) when the session ends."""
    collected = Figures()
    yield collected
    report = os.environ.get("RELIABILITY_REPORT")
    if report and collected.scenarios:
        import diffusers
        import torch

        document = {
            "scale": scale,
            "date": time.strftime("%Y-%m-%d"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
            },
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
            },
            "scenarios": collected.scenarios,
        }
        Path(report).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
