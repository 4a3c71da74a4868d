"""`helm lint --strict` with each values scenario."""

from __future__ import annotations

import subprocess

import pytest

from support.chart import CHART, SCENARIOS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_passes_strict(helm: str, scenario: str) -> None:
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *SCENARIOS[scenario]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
