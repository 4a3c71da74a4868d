"""The operator under test: the API emulator with the CRD installed, a raw HTTP client for it,
what kubectl (and the Deployment controller) would do, and the operator in a thread."""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml

from diffusion_operator import constants as c
from support.idsvc_schema import CRD_PATH
from support.kube_emulator import EmulatorThread

IDS = "/apis/imagediffusion.dev/v1alpha1/namespaces/{ns}/imagediffusionservices"
# plural -> API path prefix of each kind of child
CHILD_API = {
    "deployments": "/apis/apps/v1",
    "poddisruptionbudgets": "/apis/policy/v1",
    "services": "/api/v1",
    "persistentvolumeclaims": "/api/v1",
}


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


class OperatorThread:
    """`diffusion_operator.__main__.run_operator` (kopf, standalone) in a background thread."""

    def __init__(self, worker_image: str = "registry.test/worker:dev", resync_seconds: float = 60.0) -> None:
        from diffusion_operator.config import OperatorConfig

        self.config = OperatorConfig(
            worker_image=worker_image, log_format="plain", resync_seconds=resync_seconds
        )
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


@contextmanager
def emulated_cluster(workdir: Path) -> Iterator[EmulatorThread]:
    """The API emulator with the CRD installed, and KUBECONFIG (for kopf and the operator's client)
    pointing at it until the block ends."""
    with EmulatorThread() as running:
        kubeconfig = workdir / "config"
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


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float = 20, explain: Callable[[], str] | None = None
) -> Any:
    """Poll until probe() returns something truthy (the operator works asynchronously); on timeout,
    the failure says what `explain()` reports about the state at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f": {explain()}" if explain else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(0.1)


class Kubectl:
    """What a user or a GitOps tool does, over HTTP."""

    def __init__(self, cluster: EmulatorThread, namespace: str) -> None:
        self.client = Client(cluster.url)
        self.ns = namespace

    def ids_path(self, name: str = "") -> str:
        return IDS.format(ns=self.ns) + (f"/{name}" if name else "")

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = copy.deepcopy(manifest)
        manifest["metadata"]["namespace"] = self.ns
        response = self.client.apply(self.ids_path(manifest["metadata"]["name"]), manifest, manager="kubectl")
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.client.get(path)
        return response.json() if response.status_code == 200 else None

    def service(self, name: str) -> dict[str, Any] | None:
        return self.get(self.ids_path(name))

    def child(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.get(f"{CHILD_API[kind]}/namespaces/{self.ns}/{kind}/{name}")

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        service = self.service(name) or {}
        return next(
            (cond for cond in service.get("status", {}).get("conditions", []) if cond["type"] == type_), None
        )

    def mark_deployment_available(self, name: str, replicas: int) -> None:
        """Do what the Deployment controller does once the pods are ready."""
        deployment = self.child("deployments", name)
        assert deployment is not None
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True"},
                           {"type": "Progressing", "status": "True"}],
        }  # fmt: skip
        path = f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}/status"
        assert self.client.merge_patch(path, {"status": status}).status_code == 200

    def events(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.client.get(f"/api/v1/namespaces/{self.ns}/events").json()["items"]
        return items


def settle(cluster: EmulatorThread, namespace: str, quiet: float = 1.5, timeout: float = 20) -> None:
    """Wait until nothing has written in `namespace` for `quiet` seconds (trailing events are done)."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len([w for w in cluster.emulator.writes if w[2] == namespace])
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)
    raise AssertionError(f"writes in {namespace} did not settle")


def tiny(name: str = "tiny", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name},
        "spec": {"model": {"id": "builtin:tiny-sd"}, "resources": {"gpus": 0}, **spec},
    }  # fmt: skip
