"""Fixtures: the Kubernetes API emulator in a background thread, and the operator running against it."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kube_emulator import EmulatorThread

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "imagediffusion.dev_imagediffusionservices.yaml"


class Client:
    """Raw HTTP against the emulator, as kubectl would talk to a real API server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.request("POST", path, json=body)

    def merge_patch(self, path: str, body: Any) -> requests.Response:
        return self.request(
            "PATCH", path, data=yaml.safe_dump(body), headers={"Content-Type": "application/merge-patch+json"}
        )

    def apply(self, path: str, body: Any, manager: str = "kubectl", force: bool = True) -> requests.Response:
        return self.request(
            "PATCH",
            path,
            params={"fieldManager": manager, "force": str(force).lower()},
            data=yaml.safe_dump(body),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


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


class OperatorThread:
    """`diffusion_operator.__main__.run_operator` (kopf, standalone) in a background thread."""

    def __init__(self, worker_image: str = "registry.test/worker:dev") -> None:
        from diffusion_operator.config import OperatorConfig

        self.config = OperatorConfig(worker_image=worker_image, log_format="plain")
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from diffusion_operator.__main__ import run_operator

        try:
            run_operator(self.config, stop_flag=self.stop_flag, ready_flag=self.ready_flag, liveness=False)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> OperatorThread:
        self.thread.start()
        assert self.ready_flag.wait(20), f"the operator did not start: {self.error!r}"
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the operator did not stop"


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
