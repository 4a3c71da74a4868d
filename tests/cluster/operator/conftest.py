"""Cluster tier: a real API server from $KUBECONFIG (or in-cluster); every test skips cleanly without one."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "imagediffusion.dev_imagediffusionservices.yaml"


@pytest.fixture(scope="session")
def kube() -> Any:
    """A KubeApi against the real cluster, or skip."""
    try:
        from diffusion_operator.kube import KubeApi, load_api_client

        api = KubeApi(load_api_client(), timeout=5)
        api.request("GET", "/version")
    except Exception as exc:
        pytest.skip(f"no reachable Kubernetes cluster ($KUBECONFIG): {exc}")
    return api


@pytest.fixture(scope="session")
def crd_installed(kube: Any) -> None:
    """Server-side apply the CRD and wait until it is established."""
    import time

    crd = yaml.safe_load(CRD_PATH.read_text())
    kube.request(
        "PATCH",
        f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
        query={"fieldManager": "diffusion-cluster-tests", "force": "true"},
        body=crd,
        content_type="application/apply-patch+yaml",
    )
    for _ in range(60):
        live = kube.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        )
        if any(
            c["type"] == "Established" and c["status"] == "True"
            for c in live.get("status", {}).get("conditions", [])
        ):
            return
        time.sleep(1)
    pytest.fail("the CRD did not become Established")


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    name = "idsvc-e2e-" + uuid.uuid4().hex[:6]
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
def operator(kube: Any, crd_installed: None) -> Iterator[None]:
    """The operator in a background thread, watching all namespaces with the cluster's credentials."""
    from diffusion_operator.__main__ import run_operator
    from diffusion_operator.config import OperatorConfig

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_operator,
        args=(OperatorConfig(log_format="plain"),),
        kwargs={"stop_flag": stop, "ready_flag": ready, "liveness": False},
        daemon=True,
    )
    thread.start()
    assert ready.wait(60), "the operator did not start"
    yield
    stop.set()
    thread.join(30)
