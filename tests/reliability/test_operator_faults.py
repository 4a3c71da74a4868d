"""The operator under API faults and restarts, against the API emulator (kmock over HTTP).

Emulated instead of real: kube-apiserver and the Deployment controller, as in
tests/integration/operator (the test marks Deployments available itself). The faults are injected
by support.kube_faults before the emulator sees a request: 500s, 409 conflicts, 429 with
Retry-After, and watch streams cut short, on a seeded random share of the operator's requests.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from diffusion_operator import constants as c
from support.kube_emulator import EmulatorThread
from support.kube_faults import FaultInjector
from support.operator_harness import CHILD_API, Kubectl, OperatorThread, emulated_cluster, tiny, wait_for
from support.reliability import Figures

pytestmark = pytest.mark.integration

# (services, seconds allowed to converge) per scale
LOAD = {"ci": (2, 180), "soak": (20, 900)}
RATES = {"watch_dropped": 0.3, "throttled": 0.1, "server_error": 0.15, "conflict": 0.1}
CHILD_KINDS = ("deployments", "services", "persistentvolumeclaims", "poddisruptionbudgets")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatorThread]:
    """A fresh emulator per test: injected faults cannot leak into another test."""
    with emulated_cluster(tmp_path) as running:
        yield running


def children(kubectl: Kubectl) -> dict[str, list[dict[str, Any]]]:
    """Every child of the operator in the namespace, by kind (found by its managed-by label)."""
    selector = f"{c.LABEL_MANAGED_BY}={c.OPERATOR_NAME}"
    found = {}
    for kind in CHILD_KINDS:
        response = kubectl.client.get(
            f"{CHILD_API[kind]}/namespaces/{kubectl.ns}/{kind}", params={"labelSelector": selector}
        )
        found[kind] = response.json()["items"]
    return found


def assert_exactly_the_right_children(kubectl: Kubectl, names: list[str]) -> None:
    """One Deployment, Service, model-cache PVC and PodDisruptionBudget per service, each owned by
    it; nothing else."""
    owners = {name: kubectl.service(name)["metadata"]["uid"] for name in names}  # type: ignore[index]
    found = children(kubectl)
    expected = {
        "deployments": sorted(names),
        "services": sorted(names),
        "persistentvolumeclaims": sorted(f"{name}-model-cache" for name in names),
        "poddisruptionbudgets": sorted(names),
    }
    for kind, objects in found.items():
        assert sorted(o["metadata"]["name"] for o in objects) == expected[kind], (
            f"{kind}: duplicates or orphans"
        )
        for obj in objects:
            (owner,) = obj["metadata"]["ownerReferences"]
            assert owner["uid"] == owners[obj["metadata"]["labels"][c.LABEL_INSTANCE]], obj["metadata"]


def converged(kubectl: Kubectl, name: str, replicas: int) -> bool:
    """The children follow the spec and the status says Ready for the current generation."""
    deployment = kubectl.child("deployments", name)
    if deployment is None or deployment["spec"]["replicas"] != replicas:
        return False
    if (deployment.get("status") or {}).get("readyReplicas") != replicas:
        kubectl.mark_deployment_available(name, replicas)
        return False
    service = kubectl.service(name) or {}
    ready = kubectl.condition(name, "Ready") or {}
    return bool(
        kubectl.child("services", name)
        and kubectl.child("persistentvolumeclaims", f"{name}-model-cache")
        and ready.get("status") == "True"
        and service.get("status", {}).get("observedGeneration") == service["metadata"]["generation"]
    )


def snapshot(kubectl: Kubectl, name: str) -> str:
    """What a failed wait saw: the service's generation and status, its Deployment's replicas."""
    service = kubectl.service(name) or {}
    deployment = kubectl.child("deployments", name) or {}
    return json.dumps(
        {
            "generation": service.get("metadata", {}).get("generation"),
            "status": service.get("status"),
            "deployment_replicas": deployment.get("spec", {}).get("replicas"),
            "deployment_status": deployment.get("status"),
        }
    )


def wait_until_converged(kubectl: Kubectl, names: list[str], replicas: int, what: str, budget: float) -> None:
    """Each service converged (see `converged`); a timeout reports the stuck service's state."""
    for name in names:
        wait_for(
            f"{name} {what}",
            lambda n=name: converged(kubectl, n, replicas),  # type: ignore[misc]
            timeout=budget,
            explain=lambda n=name: snapshot(kubectl, n),  # type: ignore[misc]
        )


def test_operator_converges_under_api_faults(cluster: EmulatorThread, scale: str, figures: Figures) -> None:
    count, budget = LOAD[scale]
    faults = FaultInjector(cluster.emulator, RATES, seed=6)
    kubectl = Kubectl(cluster, "faults-" + uuid.uuid4().hex[:6])
    names = [f"svc-{index}" for index in range(count)]
    operator = OperatorThread().start()
    try:
        started = time.monotonic()
        for name in names:
            kubectl.apply(tiny(name))
        wait_until_converged(kubectl, names, 1, "to converge", budget)
        created = time.monotonic() - started
        for name in names:  # a spec change under the same faults
            kubectl.apply(tiny(name, replicas=2))
        wait_until_converged(kubectl, names, 2, "to follow", budget)
        updated = time.monotonic() - started - created
        faults.active = False
        assert_exactly_the_right_children(kubectl, names)
    finally:
        operator.stop()
    assert sum(faults.injected.values()) > 0, "no fault was injected"
    figures.record(
        "operator_api_faults",
        services=count,
        fault_rates=RATES,
        operator_requests=faults.operator_requests,
        faults_injected=dict(sorted(faults.injected.items())),
        seconds_to_ready=round(created, 1),
        seconds_to_follow_a_spec_change=round(updated, 1),
        duplicates_or_orphans=0,
    )


def test_operator_restarted_mid_reconcile_converges_without_duplicates_or_orphans(
    cluster: EmulatorThread, scale: str, figures: Figures
) -> None:
    """The first operator's Service writes all fail, so it stops part-way through every service
    (Deployments and PVCs written, Services not); a second operator finishes the job."""
    count, budget = LOAD[scale]
    kubectl = Kubectl(cluster, "restart-" + uuid.uuid4().hex[:6])
    names = [f"svc-{index}" for index in range(count)]
    blocked = True
    cluster.emulator["patch", kmock.resource("", "v1", "services")][lambda _request: blocked] << 500
    first = OperatorThread().start()
    try:
        for name in names:
            kubectl.apply(tiny(name))
        for name in names:
            wait_for(f"{name}'s Deployment", lambda n=name: kubectl.child("deployments", n), timeout=budget)  # type: ignore[misc]
        assert all(kubectl.child("services", name) is None for name in names)
    finally:
        first.stop()
    blocked = False
    started = time.monotonic()
    second = OperatorThread().start()
    try:
        wait_until_converged(kubectl, names, 1, "to converge", budget)
        assert_exactly_the_right_children(kubectl, names)
    finally:
        second.stop()
    figures.record(
        "operator_restart_mid_reconcile",
        services=count,
        seconds_to_converge_after_restart=round(time.monotonic() - started, 1),
        duplicates_or_orphans=0,
    )


def test_resync_repairs_a_stale_status_even_after_its_own_status_write_failed(
    cluster: EmulatorThread,
) -> None:
    """Nothing but the resync notices a status edited behind the operator's back (a status change
    is not a spec change and no child changed). Its first two status writes are answered 409; the
    resync must go on to later rounds instead of giving up on the service."""
    kubectl = Kubectl(cluster, "resync-" + uuid.uuid4().hex[:6])
    failures_left = 2

    def first_operator_status_writes(request: kmock.Request) -> bool:
        nonlocal failures_left
        if request.headers.get("User-Agent", "").startswith("python-requests"):
            return False  # the test's own writes go through
        if not str(request.url.path).endswith("/status") or failures_left == 0:
            return False
        failures_left -= 1
        return True

    operator = OperatorThread(resync_seconds=1).start()
    try:
        kubectl.apply(tiny("svc"))
        wait_until_converged(kubectl, ["svc"], 1, "to converge", 30)
        cluster.emulator["patch", kmock.resource(c.GROUP, c.VERSION, c.PLURAL)][
            first_operator_status_writes
        ] << kmock.Response(status=409, payload={"kind": "Status", "code": 409, "reason": "Conflict"})
        stale = {"readyReplicas": 0, "endpoint": "http://stale.invalid"}
        response = kubectl.client.merge_patch(kubectl.ids_path("svc") + "/status", {"status": stale})
        assert response.status_code == 200, response.text
        wait_for(
            "the resync to restore the status",
            lambda: (kubectl.service("svc") or {}).get("status", {}).get("readyReplicas") == 1,
            timeout=30,
            explain=lambda: snapshot(kubectl, "svc"),
        )
    finally:
        operator.stop()
    assert failures_left == 0, "the injected 409s were never hit: the test did not exercise a failed write"
    assert (kubectl.service("svc") or {})["status"]["endpoint"] != stale["endpoint"]
