"""The real operator (kopf, `run_operator`) against the API emulator: the issue's scenarios end to end.

Emulated instead of real: kube-apiserver (KubeApiEmulator over HTTP; kopf and the operator's client
talk to it through a kubeconfig), and the Deployment controller (no Pods run: tests patch the
Deployment's status as the controller would). Schema defaulting/CEL admission is not emulated, so
manifests are sent with the CRD's defaults already applied where the operator reads them.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from diffusion_operator import constants as c
from support.kube_emulator import EmulatorThread
from support.operator_harness import Kubectl, OperatorThread, settle, tiny, wait_for

pytestmark = pytest.mark.integration

SAMPLES = sorted((Path(__file__).resolve().parents[3] / "crds" / "samples").glob("*.yaml"))


@pytest.fixture
def kubectl(cluster: EmulatorThread, operator: OperatorThread, namespace: str) -> Kubectl:
    return Kubectl(cluster, namespace)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_each_sample_gets_its_children_with_the_right_fields(kubectl: Kubectl, path: Path) -> None:
    sample = yaml.safe_load(path.read_text())
    name = sample["metadata"]["name"]
    kubectl.apply(sample)
    deployment = wait_for("the Deployment", lambda: kubectl.child("deployments", name))
    service = wait_for("the Service", lambda: kubectl.child("services", name))
    pvc = wait_for("the PVC", lambda: kubectl.child("persistentvolumeclaims", name + "-model-cache"))
    owner_uid = kubectl.service(name)["metadata"]["uid"]  # type: ignore[index]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.test/worker:dev"  # the operator's DIFFUSION_OPERATOR_WORKER_IMAGE
    model = sample["spec"]["model"]
    assert container["args"][container["args"].index("--model") + 1] == model["id"]
    gpus = sample["spec"]["resources"]["gpus"]
    assert container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == (
        str(gpus) if gpus else None
    )
    assert deployment["spec"]["replicas"] == sample["spec"].get("replicas", 1)
    assert service["spec"]["ports"][0]["name"] == "http"
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    assert service["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    retained = sample["spec"].get("modelCache", {}).get("retainOnDelete", False)
    assert ("ownerReferences" in pvc["metadata"]) is not retained
    status = wait_for("status", lambda: (kubectl.service(name) or {}).get("status", {}).get("endpoint"))
    assert status == f"http://{name}.{kubectl.ns}.svc:8000/v1"


def test_status_goes_from_reconciling_to_ready_when_the_deployment_is_available(kubectl: Kubectl) -> None:
    kubectl.apply(tiny())
    reconciling = wait_for("Reconciling=True", lambda: kubectl.condition("tiny", "Reconciling"))
    assert reconciling["status"] == "True"
    assert kubectl.condition("tiny", "Ready")["status"] == "False"  # type: ignore[index]
    assert kubectl.service("tiny")["status"]["observedGeneration"] == 1  # type: ignore[index]
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    service = kubectl.service("tiny")
    assert service is not None
    assert kubectl.condition("tiny", "Reconciling")["status"] == "False"  # type: ignore[index]
    assert kubectl.condition("tiny", "Stalled")["status"] == "False"  # type: ignore[index]
    assert service["status"]["readyReplicas"] == 1 and service["status"]["servedModel"] == "builtin:tiny-sd"
    reasons = {event["reason"] for event in kubectl.events()}
    assert {"Created", "Available"} <= reasons


def test_spec_change_rolls_the_deployment_and_advances_observed_generation(kubectl: Kubectl) -> None:
    kubectl.apply(tiny())
    wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    ready_since = kubectl.condition("tiny", "Ready")["lastTransitionTime"]  # type: ignore[index]
    before = kubectl.child("deployments", "tiny")["spec"]["template"]["metadata"]["annotations"]  # type: ignore[index]

    kubectl.apply(tiny(replicas=3, resources={"gpus": 2}, parallelism={"dataParallel": 2},
                       modelCache={"accessModes": ["ReadWriteMany"]}))  # fmt: skip

    def followed() -> dict[str, Any] | None:
        deployment = kubectl.child("deployments", "tiny")
        return deployment if deployment and deployment["spec"]["replicas"] == 3 else None

    deployment = wait_for("the Deployment to follow", followed)
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"
    after = deployment["spec"]["template"]["metadata"]["annotations"]
    assert after[c.ANNOTATION_CONFIG_HASH] != before[c.ANNOTATION_CONFIG_HASH]
    wait_for("observedGeneration 2", lambda: kubectl.service("tiny")["status"]["observedGeneration"] == 2)  # type: ignore[index]
    wait_for("Ready=False", lambda: kubectl.condition("tiny", "Ready")["status"] == "False")  # type: ignore[index]
    assert kubectl.condition("tiny", "Reconciling")["status"] == "True"  # type: ignore[index]
    kubectl.mark_deployment_available("tiny", 3)
    ready = wait_for(
        "Ready=True again", lambda: (c := kubectl.condition("tiny", "Ready")) and c["status"] == "True" and c
    )
    assert ready["lastTransitionTime"] >= ready_since


def test_a_deleted_child_is_restored(kubectl: Kubectl) -> None:
    kubectl.apply(tiny())
    first = wait_for("the Service", lambda: kubectl.child("services", "tiny"))
    assert kubectl.client.delete(f"/api/v1/namespaces/{kubectl.ns}/services/tiny").status_code == 200
    restored = wait_for(
        "the Service back",
        lambda: (
            (s := kubectl.child("services", "tiny"))
            and s["metadata"]["uid"] != first["metadata"]["uid"]
            and s
        ),
        timeout=10,
    )
    assert restored["spec"]["ports"][0]["port"] == 8000


def test_a_child_edited_by_hand_is_restored(kubectl: Kubectl) -> None:
    kubectl.apply(tiny())
    wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    path = f"/apis/apps/v1/namespaces/{kubectl.ns}/deployments/tiny"
    kubectl.client.merge_patch(path, {"spec": {"replicas": 5}})
    wait_for(
        "replicas restored", lambda: kubectl.child("deployments", "tiny")["spec"]["replicas"] == 1, timeout=10
    )  # type: ignore[index]


def test_deleting_the_service_collects_children_but_keeps_a_retained_cache(kubectl: Kubectl) -> None:
    kubectl.apply(tiny("gone"))
    kubectl.apply(tiny("kept", modelCache={"retainOnDelete": True}))
    for name in ("gone", "kept"):
        wait_for("children", lambda n=name: kubectl.child("services", n))  # type: ignore[misc]
        wait_for("the PVC", lambda n=name: kubectl.child("persistentvolumeclaims", n + "-model-cache"))  # type: ignore[misc]
    for name in ("gone", "kept"):
        assert kubectl.client.delete(kubectl.ids_path(name)).status_code == 200
    wait_for("collection", lambda: kubectl.service("gone") is None and kubectl.service("kept") is None)
    for name in ("gone", "kept"):
        assert kubectl.child("deployments", name) is None
        assert kubectl.child("services", name) is None
    assert kubectl.child("persistentvolumeclaims", "gone-model-cache") is None
    assert kubectl.child("persistentvolumeclaims", "kept-model-cache") is not None


def test_unknown_pipeline_is_stalled_with_an_event_and_no_children(kubectl: Kubectl) -> None:
    kubectl.apply(tiny("odd", model={"id": "x/y", "pipeline": "NotARealPipeline"}))
    stalled = wait_for("Stalled=True", lambda: kubectl.condition("odd", "Stalled"))
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert "NotARealPipeline" in stalled["message"]
    assert kubectl.condition("odd", "Ready")["status"] == "False"  # type: ignore[index]
    wait_for("the InvalidSpec event", lambda: any(e["reason"] == "InvalidSpec" for e in kubectl.events()))
    time.sleep(0.5)
    assert kubectl.child("deployments", "odd") is None and kubectl.child("services", "odd") is None


def test_reapplying_an_unchanged_spec_writes_nothing(kubectl: Kubectl, cluster: EmulatorThread) -> None:
    kubectl.apply(tiny())
    wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    settle(cluster, kubectl.ns)

    def versions() -> dict[str, tuple[str, int]]:
        objects = {
            "ids": kubectl.service("tiny"),
            "deployment": kubectl.child("deployments", "tiny"),
            "service": kubectl.child("services", "tiny"),
            "pvc": kubectl.child("persistentvolumeclaims", "tiny-model-cache"),
        }
        return {
            k: (o["metadata"]["resourceVersion"], o["metadata"]["generation"]) for k, o in objects.items()
        }  # type: ignore[index]

    before = versions()
    writes = len(cluster.emulator.writes)
    kubectl.apply(tiny())  # what a GitOps tool does on every sync
    time.sleep(2.0)
    mine = [w for w in cluster.emulator.writes[writes:] if w[2] == kubectl.ns]
    assert mine == []
    assert versions() == before


def test_operator_restart_resumes_without_writes(
    cluster: EmulatorThread, operator: OperatorThread, namespace: str
) -> None:
    kubectl = Kubectl(cluster, namespace)
    kubectl.apply(tiny())
    wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    settle(cluster, namespace)
    operator.stop()
    writes = len(cluster.emulator.writes)
    second = OperatorThread().start()
    try:
        time.sleep(3.0)
    finally:
        second.stop()
    mine = [w for w in cluster.emulator.writes[writes:] if w[2] == namespace and w[1] != "/v1/events"]
    assert mine == []
    operator.__init__()  # type: ignore[misc]
    operator.start()  # later tests in this module keep an operator


def test_services_carry_no_finalizer_so_they_delete_without_the_operator(
    cluster: EmulatorThread, operator: OperatorThread, namespace: str
) -> None:
    """`helm uninstall` of a release holding the operator and services deletes the operator first
    (Helm deletes unknown kinds last): a finalizer would leave the services Terminating and their
    GPU Deployments running. The service starts with the finalizer an older operator (kopf timer)
    put there, so this also checks that an upgraded operator takes it off."""
    kubectl = Kubectl(cluster, namespace)
    legacy = tiny("legacy")
    legacy["metadata"]["finalizers"] = [c.FINALIZER]
    kubectl.apply(legacy)
    wait_for("the Deployment", lambda: kubectl.child("deployments", "legacy"))

    def finalizers() -> list[str]:
        service = kubectl.service("legacy")
        assert service is not None
        return list(service["metadata"].get("finalizers") or [])

    wait_for("the old finalizer to go", lambda: finalizers() == [])
    operator.stop()
    try:
        assert kubectl.client.delete(kubectl.ids_path("legacy")).status_code == 200
        wait_for("the service and its children to go", lambda: kubectl.service("legacy") is None
                 and kubectl.child("deployments", "legacy") is None)  # fmt: skip
    finally:
        operator.__init__()  # type: ignore[misc]
        operator.start()  # later tests in this module keep an operator


def test_a_crash_looping_worker_pod_puts_its_last_log_line_in_the_ready_condition(
    kubectl: Kubectl, cluster: EmulatorThread
) -> None:
    """The emulator runs no kubelet: the test creates the worker pod and writes its status as the
    kubelet would (terminationMessagePolicy FallbackToLogsOnError puts the last log lines in it).
    The operator has settled first, so only the pod's own events can carry it into the status
    (the resync loop is 60 s away)."""
    kubectl.apply(tiny())
    deployment = wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    settle(cluster, kubectl.ns)
    template = deployment["spec"]["template"]
    assert template["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    pods = f"/api/v1/namespaces/{kubectl.ns}/pods"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "tiny-7d9f-x2x",
            "namespace": kubectl.ns,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }
    assert kubectl.client.post(pods, pod).status_code == 201
    crashed = {
        "containerStatuses": [
            {
                "name": c.WORKER_CONTAINER_NAME,
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "message": "... ERROR diffusion_worker.server [-] cannot start: no such model",
                    }
                },
            }
        ]
    }
    patched = kubectl.client.merge_patch(f"{pods}/tiny-7d9f-x2x/status", {"status": crashed})
    assert patched.status_code == 200, patched.text
    ready = wait_for(
        "Ready=False WorkerFailing",
        lambda: (
            (cond := kubectl.condition("tiny", "Ready"))
            and cond["reason"] == c.REASON_WORKER_FAILING
            and cond
        ),
    )
    assert ready["status"] == "False"
    assert ready["message"].endswith(
        "worker pod tiny-7d9f-x2x: CrashLoopBackOff, restarted 4 times; last exit 1: "
        "... ERROR diffusion_worker.server [-] cannot start: no such model"
    )
    assert kubectl.condition("tiny", "Stalled")["status"] == "False"  # type: ignore[index]
    assert kubectl.client.delete(f"{pods}/tiny-7d9f-x2x").status_code == 200
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")


def test_an_image_pull_failing_after_the_rollout_keeps_its_conditions_through_the_retries(
    kubectl: Kubectl, cluster: EmulatorThread
) -> None:
    """A pod lost after the rollout is replaced on a node that cannot pull the image: the kubelet
    then alternates ErrImagePull (each retry) and ImagePullBackOff. From the first back-off on the
    service stays Stalled/WorkerFailing, with one lastTransitionTime and one Warning, instead of
    flipping at every retry (Flux and Argo CD would flip between Degraded and Progressing)."""
    kubectl.apply(tiny())
    deployment = wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    status_path = f"/apis/apps/v1/namespaces/{kubectl.ns}/deployments/tiny/status"

    def rolled_out(available: int) -> dict[str, Any]:
        conditions = [
            {"type": "Available", "status": "True" if available else "False"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ]
        generation = deployment["metadata"]["generation"]
        return {"status": {
            "observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": available,
            "availableReplicas": available, "conditions": conditions}}  # fmt: skip

    assert kubectl.client.merge_patch(status_path, rolled_out(1)).status_code == 200
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    assert kubectl.client.merge_patch(status_path, rolled_out(0)).status_code == 200
    template = deployment["spec"]["template"]
    pods = f"/api/v1/namespaces/{kubectl.ns}/pods"
    labels = template["metadata"]["labels"]
    pod = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
           "metadata": {"name": "tiny-7d9f-y3y", "namespace": kubectl.ns, "labels": labels}}  # fmt: skip
    assert kubectl.client.post(pods, pod).status_code == 201

    def kubelet_says(reason: str, message: str) -> None:
        waiting = {"reason": reason, "message": message}
        status = {"phase": "Pending", "containerStatuses": [{"name": c.WORKER_CONTAINER_NAME,
                  "restartCount": 0, "ready": False, "state": {"waiting": waiting}}]}  # fmt: skip
        patched = kubectl.client.merge_patch(f"{pods}/tiny-7d9f-y3y/status", {"status": status})
        assert patched.status_code == 200, patched.text

    kubelet_says("ImagePullBackOff", 'Back-off pulling image "registry.test/worker:dev"')
    wait_for("Stalled=True", lambda: (kubectl.condition("tiny", "Stalled") or {}).get("status") == "True")
    since = kubectl.condition("tiny", "Stalled")["lastTransitionTime"]  # type: ignore[index]
    for attempt in range(3):
        for reason in ("ErrImagePull", "ImagePullBackOff"):
            detail = f"{reason}: attempt {attempt}"  # a new message each time, to see the pass's status
            kubelet_says(reason, f"attempt {attempt}")
            ready = wait_for(
                f"Ready naming {detail}",
                lambda d=detail: (  # type: ignore[misc]
                    (cond := kubectl.condition("tiny", "Ready")) and cond["message"].endswith(d) and cond
                ),
            )
            assert ready["reason"] == c.REASON_WORKER_FAILING
            stalled = kubectl.condition("tiny", "Stalled") or {}
            assert (stalled["status"], stalled["reason"], stalled["lastTransitionTime"]) == (
                "True", c.REASON_WORKER_FAILING, since,
            )  # fmt: skip
    settle(cluster, kubectl.ns)
    warnings = [e for e in kubectl.events() if e["reason"] == c.REASON_WORKER_FAILING]
    assert len(warnings) == 1, warnings


def test_children_and_pods_are_watched_through_a_server_side_label_selector(
    kubectl: Kubectl, cluster: EmulatorThread
) -> None:
    """The operator streams only what it manages: a cluster's other Deployments, Services, PVCs and
    Pods never reach it."""
    kubectl.apply(tiny())
    wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
    managed = "app.kubernetes.io/managed-by=image-diffusion-operator"
    streamed = ("apps/v1/deployments", "/v1/services", "/v1/persistentvolumeclaims", "/v1/pods")
    selectors = [(key, selector) for key, selector in cluster.emulator.watches if key in streamed]
    assert {key for key, _ in selectors} == set(streamed)
    assert all(selector == managed for _, selector in selectors), selectors


def test_a_service_of_the_same_name_made_by_someone_else_is_left_alone(
    cluster: EmulatorThread, kubectl: Kubectl
) -> None:
    """Applying over it would repoint it at the workers and, through the owner reference, have the
    garbage collector delete it with the ImageDiffusionService."""
    theirs = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "taken", "namespace": kubectl.ns, "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    }  # fmt: skip
    path = f"/api/v1/namespaces/{kubectl.ns}/services/taken"
    assert kubectl.client.apply(path, theirs, manager="someone").status_code in (200, 201)
    kubectl.apply(tiny("taken"))
    stalled = wait_for(
        "Stalled", lambda: (kubectl.condition("taken", "Stalled") or {}).get("status") == "True"
    )
    assert stalled
    message = (kubectl.condition("taken", "Stalled") or {})["message"]
    assert message.startswith("Service taken already exists and is not this service's"), message
    service = kubectl.child("services", "taken")
    assert service is not None
    assert service["spec"]["selector"] == {"app": "web"} and "ownerReferences" not in service["metadata"]
    assert kubectl.child("deployments", "taken") is not None  # the other children are still made
    warnings = wait_for(  # posted after the status is written
        "the ApplyFailed Event",
        lambda: [e for e in kubectl.events() if e.get("reason") == c.REASON_APPLY_FAILED],
    )
    assert warnings[0]["type"] == "Warning" and warnings[0]["message"] == message


def test_a_service_re_created_under_its_name_waits_for_the_previous_cache_without_stalling(
    kubectl: Kubectl,
) -> None:
    """Deleted and applied again (kubectl delete + apply, Flux's force, Argo CD's Replace): the
    earlier service's PVC stays Terminating, held by pvc-protection, until its pods are gone. That
    fixes itself, so the new service is Reconciling (not Stalled, where Flux would stop waiting),
    posts no Warning, and creates its Deployment once the PVC is gone."""
    kubectl.apply(tiny())
    wait_for("the PVC", lambda: kubectl.child("persistentvolumeclaims", "tiny-model-cache"))
    kubectl.mark_deployment_available("tiny", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
    pvc = f"/api/v1/namespaces/{kubectl.ns}/persistentvolumeclaims/tiny-model-cache"
    protected = {"metadata": {"finalizers": ["kubernetes.io/pvc-protection"]}}  # pods still mount it
    assert kubectl.client.merge_patch(pvc, protected).status_code == 200
    old_uid = kubectl.service("tiny")["metadata"]["uid"]  # type: ignore[index]
    assert kubectl.client.delete(kubectl.ids_path("tiny")).status_code == 200
    wait_for("the service gone", lambda: kubectl.service("tiny") is None)
    kubectl.apply(tiny())
    ready = wait_for(
        "Ready=False WaitingForDeletion",
        lambda: (
            (cond := kubectl.condition("tiny", "Ready"))
            and cond["reason"] == c.REASON_WAITING_FOR_DELETION
            and cond
        ),
    )
    assert ready["status"] == "False"
    assert ready["message"].startswith(
        "waiting for the previous PersistentVolumeClaim tiny-model-cache to be deleted (held by the "
        "finalizer kubernetes.io/pvc-protection)"
    )
    assert (kubectl.condition("tiny", "Reconciling") or {}).get("status") == "True"
    assert (kubectl.condition("tiny", "Stalled") or {}).get("status") == "False"
    assert kubectl.child("deployments", "tiny") is None
    old = kubectl.child("persistentvolumeclaims", "tiny-model-cache") or {}
    assert old["metadata"].get("deletionTimestamp")
    assert old["metadata"]["ownerReferences"][0]["uid"] == old_uid
    assert kubectl.client.merge_patch(pvc, {"metadata": {"finalizers": None}}).status_code == 200
    wait_for("the new Deployment", lambda: kubectl.child("deployments", "tiny"))
    new_uid = kubectl.service("tiny")["metadata"]["uid"]  # type: ignore[index]
    cache = wait_for("the new PVC", lambda: kubectl.child("persistentvolumeclaims", "tiny-model-cache"))
    assert cache["metadata"]["ownerReferences"][0]["uid"] == new_uid
    wait_for(
        "Ready=False RollingOut",
        lambda: (kubectl.condition("tiny", "Ready") or {}).get("reason") == c.REASON_ROLLING_OUT,
    )
    assert (kubectl.condition("tiny", "Stalled") or {}).get("status") == "False"
    assert [e for e in kubectl.events() if e["type"] == "Warning"] == []


def test_a_new_service_whose_children_cannot_be_written_yet_says_so(
    cluster: EmulatorThread, kubectl: Kubectl
) -> None:
    """A fail-closed admission webhook that is down answers every write of a Deployment with 500.
    The pass is retried; meanwhile the new service has a Reconciling condition quoting the error
    (DESIGN: never a CR without conditions), and once the webhook is back the children follow."""
    down = True
    rejected = kmock.Response(
        status=500,
        payload={"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                 "reason": "InternalError",
                 "message": 'Internal error occurred: failed calling webhook "policy.example.com"'},
    )  # fmt: skip
    cluster.emulator["patch", kmock.resource("apps", "v1", "deployments")][lambda _request: down] << rejected
    try:
        kubectl.apply(tiny("webhook"))
        reconciling = wait_for("a Reconciling condition", lambda: kubectl.condition("webhook", "Reconciling"))
        assert reconciling["status"] == "True"
        assert 'failed calling webhook "policy.example.com"' in reconciling["message"]
        assert kubectl.child("deployments", "webhook") is None
    finally:
        down = False
    wait_for(
        "the Deployment after the webhook is back",
        lambda: kubectl.child("deployments", "webhook"),
        timeout=30,
    )


def _from_the_operator(request: kmock.Request) -> bool:
    """The operator's own client and kopf's, not the test's stand-in for kubectl."""
    return not request.headers.get("User-Agent", "").startswith("python-requests")


def _forbidden(message: str) -> kmock.Response:
    return kmock.Response(
        status=403,
        payload={"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                 "reason": "Forbidden", "message": message},
    )  # fmt: skip


def test_a_child_the_operator_may_no_longer_read_turns_a_ready_service_stalled(
    cluster: EmulatorThread, kubectl: Kubectl
) -> None:
    """After an RBAC change the operator's GET of the Deployment answers 403. The pass used to raise
    with no condition written, leaving Ready=True; now the service says Stalled/ApiError, naming the
    request and the status, and the first pass after the grant is back carries on."""
    locked = False
    message = 'deployments.apps "rbac" is forbidden: User "system:serviceaccount:ops:operator" cannot get'

    def operator_get_of_the_deployment(request: kmock.Request) -> bool:
        return locked and request.name == "rbac" and request.action == kmock.action.FETCH

    deployments = cluster.emulator[kmock.resource("apps", "v1", "deployments")]
    deployments[operator_get_of_the_deployment][_from_the_operator] << _forbidden(message)
    kubectl.apply(tiny("rbac"))
    wait_for("the Deployment", lambda: kubectl.child("deployments", "rbac"))
    kubectl.mark_deployment_available("rbac", 1)
    wait_for("Ready=True", lambda: (kubectl.condition("rbac", "Ready") or {}).get("status") == "True")

    locked = True
    try:
        kubectl.apply(tiny("rbac", limits={"maxQueue": 9}))  # a spec change: a pass
        stalled = wait_for(
            "Stalled/ApiError",
            lambda: (kubectl.condition("rbac", "Stalled") or {}).get("reason") == c.REASON_API_ERROR,
        )
        assert stalled
        ready = kubectl.condition("rbac", "Ready") or {}
        assert (ready["status"], ready["reason"]) == ("False", c.REASON_API_ERROR)
        path = f"/apis/apps/v1/namespaces/{kubectl.ns}/deployments/rbac"
        assert ready["message"].startswith(f"the API server refused GET {path}: HTTP 403: {message}")
        warnings = wait_for(
            "the ApiError Event", lambda: [e for e in kubectl.events() if e["reason"] == c.REASON_API_ERROR]
        )
        assert warnings[0]["type"] == "Warning" and warnings[0]["message"] == ready["message"]
    finally:
        locked = False
    kubectl.apply(tiny("rbac", limits={"maxQueue": 8}))
    wait_for(
        "the new spec applied",
        lambda: (kubectl.condition("rbac", "Ready") or {}).get("reason") != c.REASON_API_ERROR,
    )

    def ready_again() -> bool:
        # Marked at each look: the Deployment may not yet carry the new spec (a mark made before the
        # operator applied it is of the older generation, and never counts).
        kubectl.mark_deployment_available("rbac", 1)
        return (kubectl.condition("rbac", "Ready") or {}).get("status") == "True"

    wait_for("Ready=True again", ready_again)


def test_a_status_the_operator_may_no_longer_write_is_told_in_a_warning_event(
    cluster: EmulatorThread, kubectl: Kubectl
) -> None:
    """When the status subresource itself answers 403 no condition can say so: a Warning Event
    names the refused request instead of the pass failing silently; once, not again at every pass
    that is refused the same way (each spec change, child event, resync and retry posted one)."""
    message = 'imagediffusionservices.imagediffusion.dev "mute" is forbidden: cannot patch resource "status"'

    def status_write(request: kmock.Request) -> bool:
        return request.name == "mute" and request.subresource == "status"

    services = cluster.emulator["patch", kmock.resource(c.GROUP, c.VERSION, c.PLURAL)]
    services[status_write][_from_the_operator] << _forbidden(message)
    kubectl.apply(tiny("mute"))
    wait_for("the Deployment", lambda: kubectl.child("deployments", "mute"))
    warnings = wait_for(
        "the ApiError Event", lambda: [e for e in kubectl.events() if e["reason"] == c.REASON_API_ERROR]
    )
    path = f"/apis/{c.API_VERSION}/namespaces/{kubectl.ns}/{c.PLURAL}/mute/status"
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["message"].startswith(f"the API server refused PATCH {path}: HTTP 403: {message}")
    assert "conditions" not in (kubectl.service("mute") or {}).get("status", {})

    def services_created() -> int:
        return sum(e["message"] == "Created Service mute" for e in kubectl.events())

    # Two more passes, each refused the status write: deleting the Service is a child event, and the
    # pass creates it again. kopf posts one Event at a time, in order: the second pass's Created comes
    # after any Warning of the first.
    for passes in (2, 3):
        assert kubectl.client.delete(f"/api/v1/namespaces/{kubectl.ns}/services/mute").status_code == 200
        created = functools.partial(lambda passes: services_created() >= passes, passes)
        wait_for(f"the Service created again ({passes})", created, timeout=30)
    assert len([e for e in kubectl.events() if e["reason"] == c.REASON_API_ERROR]) == 1
