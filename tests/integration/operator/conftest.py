"""Fixtures: the Kubernetes API emulator in a background thread, and the operator running against it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from support.kube_emulator import EmulatorThread
from support.operator_harness import Client, OperatorThread, emulated_cluster


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread() as running:
        yield running


@pytest.fixture
def client(emulator: EmulatorThread) -> Client:
    return Client(emulator.url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    """One emulator with the CRD installed, shared by a module's tests (each test uses its own namespace)."""
    with emulated_cluster(tmp_path_factory.mktemp("kube")) as running:
        yield running


@pytest.fixture(scope="module")
def operator(cluster: EmulatorThread) -> Iterator[OperatorThread]:
    running = OperatorThread().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def namespace(cluster: EmulatorThread) -> str:
    """A fresh namespace name (the emulator does not require Namespace objects)."""
    return "test-" + uuid.uuid4().hex[:8]
