"""The chart grants the operator what it calls, and the calls a whole service lifecycle makes are
recorded to prove it: every (API group, resource, verb) the operator and kopf used is granted by
the chart's ClusterRole, and every grant is either used or listed in ALLOWED_UNUSED with a reason.

Emulated instead of real: kube-apiserver (the API emulator has no RBAC, so the test records the
requests and maps each to the verb RBAC would check), and the Deployment controller.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import kmock
import pytest

from support.chart import Render
from support.operator_harness import Kubectl, OperatorThread, emulated_cluster, tiny, wait_for

pytestmark = pytest.mark.integration

Grant = tuple[str, str, str]  # (API group, resource[/subresource], verb)

# Granted but never called in the lifecycle, each for a reason the lifecycle cannot show.
ALLOWED_UNUSED: dict[Grant, str] = {
    ("imagediffusion.dev", "imagediffusionservices/finalizers", "update"): (
        "owner references with blockOwnerDeletion: the OwnerReferencesPermissionEnforcement admission "
        "plugin checks it on the children's writes, not as a call of its own"
    ),
    ("imagediffusion.dev", "imagediffusionservices/status", "get"): "kopf may read the status subresource",
    ("", "events", "patch"): "kopf's poster may patch an Event it posted (a repeated one)",
    ("", "namespaces", "list"): "kopf follows namespaces when DIFFUSION_OPERATOR_NAMESPACES has patterns",
    ("", "namespaces", "watch"): "as above",
}


class Recorder:
    """An emulator rule that matches nothing and records the operator's requests as RBAC checks."""

    def __init__(self) -> None:
        # kmock asks its rules again about requests it logged: one entry per request, each kept
        # alive with its entry so that its id() is not reused by a later request.
        self.seen: dict[int, tuple[kmock.Request, Grant | None]] = {}

    def __call__(self, request: kmock.Request) -> bool:
        if id(request) not in self.seen and not request.headers.get("User-Agent", "").startswith(
            "python-requests"  # the test's own client, standing in for kubectl
        ):
            self.seen[id(request)] = (request, rbac_check(str(request.method.value).upper(), request))
        return False

    def checks(self) -> set[Grant]:
        found: set[Grant] = set()
        for _, check in self.seen.values():
            if check is None:
                continue
            group, resource, verb = check
            if verb == "apply":  # server-side apply is a patch that creates what does not exist yet
                found |= {(group, resource, "patch"), (group, resource, "create")}
            else:
                found.add(check)
        return found


def rbac_check(method: str, request: kmock.Request) -> Grant | None:
    """The (group, resource, verb) RBAC checks for one request; None for discovery paths."""
    parts = request.url.path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # a namespaced resource, not the namespace itself
    if not rest:
        return None  # discovery: /api/v1, /apis/GROUP/VERSION
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    if method == "GET":
        verb = "watch" if request.params.get("watch") in ("true", "1") else ("get" if named else "list")
    elif method == "PATCH":
        is_apply = "apply-patch" in request.headers.get("Content-Type", "")
        verb = "apply" if is_apply else "patch"
    else:
        verb = {"POST": "create", "PUT": "update", "DELETE": "delete" if named else "deletecollection"}[
            method
        ]
    return group, resource, verb


def granted(render: Render) -> set[Grant]:
    (role,) = [
        m for m in render() if m["kind"] == "ClusterRole" and m["metadata"]["name"].endswith("-operator")
    ]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_chart_grants_exactly_what_a_service_lifecycle_calls(render: Render, tmp_path: Path) -> None:
    recorder = Recorder()
    with emulated_cluster(tmp_path) as cluster:
        cluster.emulator[recorder] << kmock.Response(status=500)  # never answers: the rule matches nothing
        kubectl = Kubectl(cluster, "rbac-" + uuid.uuid4().hex[:6])
        operator = OperatorThread(resync_seconds=1).start()
        try:
            kubectl.apply(tiny())  # create: children applied, pods read while rolling out
            wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
            kubectl.mark_deployment_available("tiny", 1)  # Ready: status written, Available event
            wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
            kubectl.apply(tiny(replicas=2))  # a spec change
            wait_for("generation 2", lambda: kubectl.service("tiny")["status"]["observedGeneration"] == 2)  # type: ignore[index]
            first = kubectl.child("services", "tiny")
            assert first is not None
            assert kubectl.client.delete(f"/api/v1/namespaces/{kubectl.ns}/services/tiny").status_code == 200
            wait_for(
                "the Service back",  # a child deleted by hand
                lambda: (
                    (kubectl.child("services", "tiny") or first)["metadata"]["uid"]
                    != first["metadata"]["uid"]
                ),
            )
            time.sleep(2.5)  # resync rounds
            assert kubectl.client.delete(kubectl.ids_path("tiny")).status_code == 200
            wait_for("the service gone", lambda: kubectl.service("tiny") is None)
        finally:
            operator.stop()
    used = recorder.checks()
    grants = granted(render)
    missing = sorted(used - grants)
    assert not missing, f"the operator calls what the chart does not grant: {missing}"
    unused = sorted(grants - used - set(ALLOWED_UNUSED))
    assert not unused, f"granted but never called (least privilege): {unused}; used: {sorted(used)}"
