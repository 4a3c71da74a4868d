"""Cluster tier: skips cleanly without a cluster, unless E2E_REQUIRE_CLUSTER=1 (as `make e2e` sets)."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

REQUIRE_CLUSTER_ENV = "E2E_REQUIRE_CLUSTER"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Under E2E_REQUIRE_CLUSTER=1 a skip here is a failure: an e2e run that tested nothing must not pass."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if os.environ.get(REQUIRE_CLUSTER_ENV) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, but {REQUIRE_CLUSTER_ENV}=1 makes a skip in tests/cluster a failure: {reason}"
        )
