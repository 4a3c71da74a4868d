"""Fixtures: the Kubernetes API emulator in a background thread, and the operator running against it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.kube_emulator import EmulatorThread
from support.operator_harness import Client, OperatorThread

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "imagediffusion.dev_imagediffusionservices.yaml"


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
    with EmulatorThread() as running:
        kubeconfig = tmp_path_factory.mktemp("kube") / "config"
        kubeconfig.write_text(running.kubeconfig())
        saved = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        # kopf logs in through kubernetes.config, whose default path was fixed when it was imported.
        import kubernetes.config.kube_config as kube_config

        saved_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
        response = Client(running.url).post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD_PATH.read_text())
        )
        assert response.status_code == 201, response.text
        try:
            yield running
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_default
            if saved is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved


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
