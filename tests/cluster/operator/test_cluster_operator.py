"""Against a real API server (opt-in: `pytest -m cluster`, skipped without a reachable cluster).

Real here, emulated in the integration tier: CRD admission (OpenAPI schema, defaults, CEL rules),
server-side apply with per-field ownership, garbage collection, and the Deployment controller.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

SAMPLES = sorted((Path(__file__).resolve().parents[3] / "crds" / "samples").glob("*.yaml"))
IDS = "/apis/imagediffusion.dev/v1alpha1/namespaces/{ns}/imagediffusionservices"


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


def create(kube: Any, namespace: str, manifest: dict[str, Any], dry_run: bool = False) -> Any:
    query = {"dryRun": "All"} if dry_run else None
    return kube.request("POST", IDS.format(ns=namespace), query=query, body=manifest)


def tiny(name: str = "tiny", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "imagediffusion.dev/v1alpha1", "kind": "ImageDiffusionService",
            "metadata": {"name": name},
            "spec": {"model": {"id": "builtin:tiny-sd"}, "resources": {"gpus": 0}, **spec}}  # fmt: skip


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_the_server_admits_each_sample(kube: Any, crd_installed: None, namespace: str, path: Path) -> None:
    created = create(kube, namespace, yaml.safe_load(path.read_text()), dry_run=True)
    assert created["spec"]["resources"]["gpuResourceName"] == "nvidia.com/gpu"  # defaulted by the server


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {"id": "a", "path": "/b"}}, "exactly one"),
        ({"model": {"id": "a"}, "resources": {"gpus": 2}}, "dataParallel"),
        ({"model": {"id": "a"}, "storage": {"url": "http://x"}}, "scheme"),
        ({"model": {"id": "a"}, "limits": {"maxBatchSize": 9, "maxQueue": 3}}, "maxBatchSize"),
        ({"model": {"id": "a"}, "replicas": 2, "resources": {"gpus": 0}}, "ReadWriteMany"),
        ({"model": {"id": "a", "dtype": "float8"}}, "float8"),
        ({"model": {"id": "a"}, "resources": {"limits": {"nvidia.com/gpu": 2}}}, "GPU resource"),
        ({"model": {"id": "a"}, "modelCache": {"size": "0Gi"}}, "above 0"),
        ({"model": {"id": "a"}, "storage": {"url": "file:///data"}}, "/models/ or /tmp/"),
        ({"model": {"id": "a"}, "rollout": {"startupTimeoutSeconds": 30}}, "startupTimeoutSeconds"),
    ],
)
def test_the_server_rejects_bad_specs_with_cel_and_schema(
    kube: Any, crd_installed: None, namespace: str, spec: dict[str, Any], message: str
) -> None:
    from diffusion_operator.kube import ApiError

    manifest = tiny()
    manifest["spec"] = spec
    with pytest.raises(ApiError) as caught:
        create(kube, namespace, manifest, dry_run=True)
    assert caught.value.status == 422 and message in caught.value.message


def test_operator_makes_children_restores_them_and_gc_collects_them(
    kube: Any, operator: None, namespace: str
) -> None:
    created = create(kube, namespace, tiny())
    get = kube.get
    deployment = wait_for("Deployment", lambda: get("apps/v1", "Deployment", namespace, "tiny"))
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    service = wait_for("Service", lambda: get("v1", "Service", namespace, "tiny"))

    def conditions() -> Any:
        owner = get("imagediffusion.dev/v1alpha1", "ImageDiffusionService", namespace, "tiny") or {}
        return owner.get("status", {}).get("conditions")

    status = wait_for("status", conditions)
    assert {c["type"] for c in status} == {"Ready", "Reconciling", "Stalled"}
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/services/tiny")
    wait_for("Service restored", lambda: (s := get("v1", "Service", namespace, "tiny"))
             and s["metadata"]["uid"] != service["metadata"]["uid"])  # fmt: skip
    before = copy.deepcopy(get("apps/v1", "Deployment", namespace, "tiny"))
    kube.request("PATCH", IDS.format(ns=namespace) + "/tiny", body=tiny(), query={"fieldManager": "gitops",
                 "force": "true"}, content_type="application/apply-patch+yaml")  # fmt: skip
    time.sleep(3)
    after = get("apps/v1", "Deployment", namespace, "tiny")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    kube.request("DELETE", IDS.format(ns=namespace) + "/tiny")
    wait_for("GC", lambda: get("apps/v1", "Deployment", namespace, "tiny") is None, timeout=120)
