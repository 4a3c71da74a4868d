"""Reconcile: apply only what differs, report events, and turn invalid specs into Stalled without children.

Emulated instead of real: the API server is an in-memory fake of KubeApi (get/list/apply) here; the
integration tier runs the same code over HTTP against the emulator.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from diffusion_operator import constants as c
from diffusion_operator.kube import PLURALS, ApiError, object_path
from diffusion_operator.reconcile import (
    Event,
    Outcome,
    apply_children,
    first_pass_failed,
    is_subset,
    needs_apply,
    reconcile_service,
)
from diffusion_operator.render import child_labels, render_children
from diffusion_operator.spec import Meta, parse_spec


class FakeApi:
    """Stores applied objects, adds server-side defaults, counts writes."""

    def __init__(self, fail_apply: ApiError | None = None, fail_kinds: frozenset[str] | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.applies: list[str] = []
        self.fail_apply = fail_apply
        self.fail_kinds = fail_kinds  # None: every kind fails with fail_apply
        self.fail_list: ApiError | None = None
        self.fail_get: dict[str, ApiError] = {}  # kind -> the error every get of that kind raises

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind in self.fail_get:
            raise self.fail_get[kind]
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found else None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        if self.fail_list is not None:
            raise self.fail_list
        wanted = dict(pair.split("=", 1) for pair in label_selector.split(","))
        return [
            copy.deepcopy(obj)
            for (stored_kind, stored_namespace, _), obj in self.objects.items()
            if (stored_kind, stored_namespace) == (kind, namespace)
            and wanted.items() <= (obj["metadata"].get("labels") or {}).items()
        ]

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.fail_apply is not None and (self.fail_kinds is None or manifest["kind"] in self.fail_kinds):
            raise self.fail_apply
        meta = manifest["metadata"]
        stored = copy.deepcopy(manifest)
        stored["metadata"]["uid"] = "child-uid"  # server-filled
        stored.setdefault("status", {})
        self.objects[(manifest["kind"], meta["namespace"], meta["name"])] = stored
        self.applies.append(manifest["kind"])
        return copy.deepcopy(stored)


def body(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "svc", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec, "status": status or {}}  # fmt: skip


SPEC = {"model": {"id": "builtin:tiny-sd"}, "resources": {"gpus": 0}}


def test_subset_tolerates_server_added_fields_but_not_changed_ones() -> None:
    want = {"spec": {"containers": [{"name": "w", "image": "a"}]}}
    assert is_subset(want, {"spec": {"containers": [{"name": "w", "image": "a", "imagePullPolicy": "X"}]}})
    assert not is_subset(want, {"spec": {"containers": [{"name": "w", "image": "b"}]}})
    assert not is_subset(want, {"spec": {"containers": []}})


def test_quantities_the_server_stored_in_canonical_form_need_no_apply() -> None:
    """The API server stores `1000m` as `1` and `1.5Gi` as `1536Mi`; comparing the strings would
    re-apply the Deployment and PVC (and post an Updated event) on every pass."""
    spec = SPEC | {
        "resources": {
            "gpus": 0,
            "requests": {"cpu": "1000m", "memory": "1.5Gi"},
            "limits": {"memory": "2048Mi"},
        },
        "modelCache": {"size": "1024Gi"},
    }
    pvc, deployment = render_children(parse_spec(spec), Meta("svc", "ns", "u1"))[:2]
    live = copy.deepcopy(deployment)
    resources = live["spec"]["template"]["spec"]["containers"][0]["resources"]
    resources["requests"] = {"cpu": "1", "memory": "1536Mi"}
    resources["limits"] = {"memory": "2Gi"}
    live_pvc = copy.deepcopy(pvc)
    live_pvc["spec"]["resources"]["requests"]["storage"] = "1Ti"
    assert not needs_apply(deployment, live)
    assert not needs_apply(pvc, live_pvc)
    resources["requests"]["cpu"] = "2"  # a real change still shows
    assert needs_apply(deployment, live)
    # Only quantity maps compare by amount: an env value "1.0" edited to "1" is drift.
    assert not is_subset({"env": [{"name": "X", "value": "1.0"}]}, {"env": [{"name": "X", "value": "1"}]})


def test_needs_apply_when_missing_rerendered_or_edited_by_hand() -> None:
    deployment = render_children(parse_spec(SPEC), Meta("svc", "ns", "u1"))[1]
    assert needs_apply(deployment, None)
    live = copy.deepcopy(deployment) | {"status": {"replicas": 1}}
    assert not needs_apply(deployment, live)
    live["spec"]["replicas"] = 7
    assert needs_apply(deployment, live)
    rerendered = render_children(parse_spec(SPEC | {"replicas": 0}), Meta("svc", "ns", "u1"))[1]
    assert needs_apply(rerendered, deployment | {})


def test_first_pass_creates_children_and_reports_reconciling() -> None:
    api = FakeApi()
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"]
    assert [e.reason for e in outcome.events] == ["Created"] * 4
    reconciling = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Reconciling")
    assert reconciling["status"] == "True"
    assert outcome.status_delta["observedGeneration"] == 1


def test_second_pass_with_same_spec_writes_nothing() -> None:
    api = FakeApi()
    first = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    second = reconcile_service(api, body(SPEC, first.status_delta), "img")  # type: ignore[arg-type]
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"]
    assert second.status_delta == {} and second.events == []


def test_unknown_pipeline_makes_no_children_and_one_event() -> None:
    api = FakeApi()
    spec = {"model": {"id": "x", "pipeline": "NotARealPipeline"}}
    outcome = reconcile_service(api, body(spec), "img")  # type: ignore[arg-type]
    assert outcome.invalid and "NotARealPipeline" in outcome.invalid
    assert api.applies == []
    stalled = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_INVALID_SPEC)
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", c.REASON_INVALID_SPEC)]
    again = reconcile_service(api, body(spec, outcome.status_delta), "img")  # type: ignore[arg-type]
    assert again.events == [] and again.status_delta == {}


def test_transient_api_errors_propagate_for_retry() -> None:
    api = FakeApi(fail_apply=ApiError(503, "unavailable"))
    with pytest.raises(ApiError) as caught:
        reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert caught.value.transient


def test_a_new_service_whose_pass_keeps_failing_gets_reconciling_with_the_error() -> None:
    """DESIGN: never leave a CR without conditions. A fail-closed admission webhook that is down
    answers 500 to every apply; the pass is retried, and meanwhile the status says why."""
    error = ApiError(500, 'Internal error occurred: failed calling webhook "policy.example.com"')
    status = first_pass_failed(body(SPEC), error)
    assert status is not None and status["observedGeneration"] == 1
    conditions = {cond["type"]: cond for cond in status["conditions"]}
    assert conditions["Reconciling"]["status"] == "True"
    assert conditions["Ready"]["status"] == conditions["Stalled"]["status"] == "False"
    assert 'failed calling webhook "policy.example.com"' in conditions["Reconciling"]["message"]
    assert "endpoint" not in status
    # A service with conditions keeps them: they describe what runs until a pass finishes.
    first = reconcile_service(FakeApi(), body(SPEC), "img")  # type: ignore[arg-type]
    assert first_pass_failed(body(SPEC, first.status_delta), error) is None


def test_rejected_child_is_stalled_apply_failed() -> None:
    api = FakeApi(
        fail_apply=ApiError(422, "spec.resources.requests.storage: field can not be less than previous")
    )
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    stalled = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_APPLY_FAILED)
    assert [e.reason for e in outcome.events] == [c.REASON_APPLY_FAILED]


def test_a_rejected_pvc_change_does_not_hold_back_the_deployment() -> None:
    """A PVC shrink and an image change in one commit: the image still rolls out, and the status
    names the PVC's rejection."""
    api = FakeApi()
    first = reconcile_service(api, body(SPEC), "worker:1")  # type: ignore[arg-type]
    api.fail_apply = ApiError(422, "spec.resources.requests.storage: field can not be less than previous")
    api.fail_kinds = frozenset({"PersistentVolumeClaim"})
    changed = SPEC | {"image": "worker:2", "modelCache": {"size": "1Gi"}}
    outcome = reconcile_service(api, body(changed, first.status_delta), "worker:1")  # type: ignore[arg-type]
    deployment = api.get("apps/v1", "Deployment", "ns", "svc")
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "worker:2"
    stalled = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_APPLY_FAILED)
    assert stalled["message"].startswith("the API server rejected PersistentVolumeClaim svc-model-cache: ")
    assert [e.reason for e in outcome.events] == [c.REASON_UPDATED, c.REASON_APPLY_FAILED]


def stalled_condition(outcome: Outcome) -> dict[str, Any]:
    return next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")


def test_an_object_of_a_childs_name_that_is_not_the_services_is_left_alone() -> None:
    """A Service `svc` someone made for other pods: applying over it would repoint it at the
    workers and, with the owner reference, delete it with the service."""
    api = FakeApi()
    theirs = {"metadata": {"name": "svc", "namespace": "ns"}, "spec": {"selector": {"app": "other"}}}
    api.objects[("Service", "ns", "svc")] = copy.deepcopy(theirs)
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.objects[("Service", "ns", "svc")] == theirs
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "PodDisruptionBudget"]
    stalled = stalled_condition(outcome)
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_APPLY_FAILED)
    assert stalled["message"] == (
        "Service svc already exists and is not this service's (it was not created for this service); "
        "delete or rename it, or give the service another name"
    )
    assert [e.reason for e in outcome.events] == [c.REASON_CREATED] * 3 + [c.REASON_APPLY_FAILED]


def test_a_pvc_of_the_caches_name_owned_by_another_controller_holds_back_the_deployment() -> None:
    """Its pods would mount someone else's volume and write a model into it."""
    api = FakeApi()
    owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s1", "controller": True}
    theirs = {"metadata": {"name": "svc-model-cache", "namespace": "ns", "ownerReferences": [owner]}}
    api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")] = copy.deepcopy(theirs)
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")] == theirs
    assert api.applies == ["Service", "PodDisruptionBudget"]
    message = stalled_condition(outcome)["message"]
    assert "PersistentVolumeClaim svc-model-cache already exists" in message
    assert "controlled by StatefulSet db (uid s1)" in message
    assert "Deployment svc not applied: its pods would mount that PersistentVolumeClaim" in message


EARLIER = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "svc", "uid": "old", "controller": True}


def test_a_kept_model_cache_is_taken_back_and_an_earlier_services_children_are_waited_for() -> None:
    """A cache kept by retainOnDelete (no owner, this service's labels) is the service's again when
    it is created anew; a child still owned by an earlier service of the same name (garbage
    collection under way) is left to the collector, without Stalled or a Warning, and the pass
    after its removal creates ours."""
    api = FakeApi()
    kept = {
        "metadata": {
            "name": "svc-model-cache",
            "namespace": "ns",
            "labels": child_labels(Meta("svc", "ns", "old")),
        }
    }
    api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")] = kept
    api.objects[("Service", "ns", "svc")] = {
        "metadata": {"name": "svc", "namespace": "ns", "ownerReferences": [EARLIER]}
    }
    first = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "PodDisruptionBudget"]
    cache = api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")]
    assert [owner["uid"] for owner in cache["metadata"]["ownerReferences"]] == ["u1"]
    assert stalled_condition(first)["status"] == "False"
    assert ready_condition(first)["message"] == (
        "waiting for the previous Service svc to be deleted "
        "(owned by the deleted ImageDiffusionService svc, uid old)"
    )
    assert all(event.type == "Normal" for event in first.events)
    del api.objects[("Service", "ns", "svc")]  # the garbage collector's turn
    second = reconcile_service(api, body(SPEC, first.status_delta), "img")  # type: ignore[arg-type]
    assert api.applies[-1:] == ["Service"]
    assert stalled_condition(second)["status"] == "False"


def test_a_re_created_service_waits_for_the_previous_cache_being_deleted_without_stalling() -> None:
    """Deleted and created again under the same name (kubectl delete + apply, Argo CD's Replace):
    the earlier service's PVC stays Terminating, held by pvc-protection, while its pods terminate.
    That fixes itself, so Reconciling (Flux keeps waiting), no Warning; the Deployment, whose pods
    would mount that volume, waits too."""
    api = FakeApi()
    terminating = {
        "metadata": {
            "name": "svc-model-cache", "namespace": "ns", "labels": child_labels(Meta("svc", "ns", "old")),
            "ownerReferences": [EARLIER], "deletionTimestamp": "2026-12-01T05:00:00Z",
            "finalizers": ["kubernetes.io/pvc-protection"],
        }
    }  # fmt: skip
    api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")] = copy.deepcopy(terminating)
    first = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")] == terminating
    assert api.applies == ["Service", "PodDisruptionBudget"]
    conditions = {cond["type"]: cond for cond in first.status_delta["conditions"]}
    message = (
        "waiting for the previous PersistentVolumeClaim svc-model-cache to be deleted (held by the "
        "finalizer kubernetes.io/pvc-protection); Deployment svc not applied: its pods would mount "
        "that PersistentVolumeClaim"
    )
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
        "False",
        c.REASON_WAITING_FOR_DELETION,
    )
    assert conditions["Ready"]["message"] == message
    assert (conditions["Reconciling"]["status"], conditions["Reconciling"]["reason"]) == (
        "True", c.REASON_WAITING_FOR_DELETION,
    )  # fmt: skip
    assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == (
        "False",
        c.REASON_AS_EXPECTED,
    )
    assert all(event.type == "Normal" for event in first.events)
    del api.objects[("PersistentVolumeClaim", "ns", "svc-model-cache")]  # the pods are gone
    second = reconcile_service(api, body(SPEC, first.status_delta), "img")  # type: ignore[arg-type]
    assert api.applies[-2:] == ["PersistentVolumeClaim", "Deployment"]
    assert ready_condition(second)["reason"] == c.REASON_ROLLING_OUT
    assert stalled_condition(second)["status"] == "False"


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_a_child_of_someone_else_being_deleted_is_waited_for_not_applied_over(kind: str) -> None:
    theirs = {
        "metadata": {"name": "svc", "namespace": "ns", "deletionTimestamp": "2026-12-01T05:00:00Z",
                     "finalizers": ["example.com/cleanup"]},
    }  # fmt: skip
    api = FakeApi()
    api.objects[(kind, "ns", "svc")] = copy.deepcopy(theirs)
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert api.objects[(kind, "ns", "svc")] == theirs
    assert kind not in api.applies
    ready = ready_condition(outcome)
    assert (ready["reason"], ready["message"]) == (
        c.REASON_WAITING_FOR_DELETION,
        f"waiting for the previous {kind} svc to be deleted (held by the finalizer example.com/cleanup)",
    )
    assert stalled_condition(outcome)["status"] == "False"
    assert c.REASON_APPLY_FAILED not in [event.reason for event in outcome.events]


def test_a_pass_reads_the_worker_pods_of_its_own_service_into_the_ready_condition() -> None:
    api = FakeApi()
    reconcile_service(api, body(SPEC), "worker:1")
    crashing = {
        "metadata": {"name": "pod", "namespace": "ns", "labels": child_labels(Meta("other", "ns", "u2"))},
        "status": {
            "containerStatuses": [
                {
                    "name": c.WORKER_CONTAINER_NAME,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
                }
            ]
        },
    }
    api.objects[("Pod", "ns", "other-pod")] = crashing  # another service's pod: not ours
    assert ready_condition(reconcile_service(api, body(SPEC), "worker:1"))["reason"] == c.REASON_ROLLING_OUT
    api.objects[("Pod", "ns", "svc-pod")] = {
        **crashing,
        "metadata": {
            **crashing["metadata"],
            "name": "svc-pod",
            "labels": child_labels(Meta("svc", "ns", "u1")),
        },
    }
    ready = ready_condition(reconcile_service(api, body(SPEC), "worker:1"))
    assert (ready["reason"], ready["message"]) == (
        c.REASON_WORKER_FAILING,
        "rolling out: 0/1 worker pods updated, 0 available; worker pod svc-pod: ImagePullBackOff: "
        "Back-off pulling image",
    )


def ready_condition(outcome: Outcome) -> dict[str, Any]:
    return next(cond for cond in outcome.status_delta["conditions"] if cond["type"] == "Ready")


def test_a_worker_problem_posts_one_warning_when_it_starts_not_on_every_restart() -> None:
    api = FakeApi()
    status: dict[str, Any] = {}

    def run_pass() -> list[Event]:
        outcome = reconcile_service(api, body(SPEC, status), "worker:1")
        status.update(outcome.status_delta)
        return outcome.events

    run_pass()
    crash = {
        "metadata": {"name": "svc-pod", "namespace": "ns", "labels": child_labels(Meta("svc", "ns", "u1"))},
        "status": {
            "containerStatuses": [
                {
                    "name": c.WORKER_CONTAINER_NAME,
                    "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                }
            ]
        },
    }
    api.objects[("Pod", "ns", "svc-pod")] = crash
    (warning,) = run_pass()
    assert (warning.type, warning.reason) == ("Warning", c.REASON_WORKER_FAILING)
    assert warning.message.endswith("worker pod svc-pod: CrashLoopBackOff, restarted 2 times")
    crash["status"]["containerStatuses"][0]["restartCount"] = 3
    assert run_pass() == [], "a restart changes the message, not the problem"
    assert "restarted 3 times" in ready_condition_of(status)["message"]
    del api.objects[("Pod", "ns", "svc-pod")]
    assert run_pass() == []
    api.objects[("Pod", "ns", "svc-pod")] = crash
    assert [event.reason for event in run_pass()] == [c.REASON_WORKER_FAILING], "a new episode warns again"


def test_an_image_pull_failing_after_the_rollout_warns_once_not_at_every_retry() -> None:
    """The kubelet alternates ErrImagePull (a retry) and ImagePullBackOff: the status stays
    Stalled/WorkerFailing through both, and one Warning is posted for the whole episode."""
    api = FakeApi()
    status: dict[str, Any] = {}

    def run_pass() -> list[Event]:
        outcome = reconcile_service(api, body(SPEC, status), "worker:1")
        status.update(outcome.status_delta)
        return outcome.events

    run_pass()
    api.objects[("Deployment", "ns", "svc")]["status"] = {
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 0,
        "availableReplicas": 0, "conditions": [
            {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
    }  # fmt: skip
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "worker:1"'}
    api.objects[("Pod", "ns", "svc-pod")] = {
        "metadata": {"name": "svc-pod", "namespace": "ns", "labels": child_labels(Meta("svc", "ns", "u1"))},
        "status": {"phase": "Pending", "containerStatuses": [
            {"name": c.WORKER_CONTAINER_NAME, "restartCount": 0, "ready": False,
             "state": {"waiting": waiting}}]},
    }  # fmt: skip
    warnings = [event for event in run_pass() if event.type == "Warning"]
    since = stalled_of(status)["lastTransitionTime"]
    for _ in range(3):
        for reason, message in (
            ("ErrImagePull", "rpc error: 403 Forbidden"),
            ("ImagePullBackOff", "Back-off"),
        ):
            waiting.update(reason=reason, message=message)
            warnings += [event for event in run_pass() if event.type == "Warning"]
            assert ready_condition_of(status)["reason"] == c.REASON_WORKER_FAILING
            assert (stalled_of(status)["status"], stalled_of(status)["lastTransitionTime"]) == ("True", since)
    assert [event.reason for event in warnings] == [c.REASON_WORKER_FAILING]


def stalled_of(status: dict[str, Any]) -> dict[str, Any]:
    return next(cond for cond in status["conditions"] if cond["type"] == "Stalled")


def ready_condition_of(status: dict[str, Any]) -> dict[str, Any]:
    return next(cond for cond in status["conditions"] if cond["type"] == "Ready")


@pytest.mark.parametrize("error", [ApiError(500, "etcd timeout"), ApiError(403, "pods is forbidden")])
def test_failing_to_list_pods_does_not_fail_the_pass(error: ApiError) -> None:
    api = FakeApi()
    api.fail_list = error
    outcome = reconcile_service(api, body(SPEC), "worker:1")
    assert ready_condition(outcome)["reason"] == c.REASON_ROLLING_OUT


def test_a_transient_pod_list_failure_is_retried_while_the_status_names_a_pod_problem() -> None:
    api = FakeApi()
    reconcile_service(api, body(SPEC), "worker:1")
    api.fail_list = ApiError(500, "etcd timeout")
    previous = {"conditions": [{"type": "Ready", "status": "False", "reason": c.REASON_WORKER_FAILING}]}
    with pytest.raises(ApiError):
        reconcile_service(api, body(SPEC, previous), "worker:1")
    api.fail_list = ApiError(403, "pods is forbidden")  # will not get better: go on without pods
    assert ready_condition(reconcile_service(api, body(SPEC, previous), "worker:1"))["reason"] == (
        c.REASON_ROLLING_OUT
    )


def test_a_deployment_the_server_cannot_type_is_apply_failed_not_retried_forever() -> None:
    """A real API server answers a server-side apply that does not fit the kind's schema (here an
    env value given as a YAML boolean) with HTTP 500 "failed to create typed patch object", not
    4xx (kubernetes/kubernetes#122480). Treated as transient, the pass was retried every 5 s with
    no status and no Service; now it is Stalled/ApplyFailed and the other children are applied."""
    message = (
        "failed to create typed patch object (ns/svc; apps/v1, Kind=Deployment): .spec.template.spec"
        '.containers[name="worker"].env[name="X"].value: expected string, '
        "got &value.valueUnstructured{Value:true}"
    )
    api = FakeApi(fail_apply=ApiError(500, message), fail_kinds=frozenset({"Deployment"}))
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    stalled = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_APPLY_FAILED)
    assert "expected string" in stalled["message"]
    assert "Service" in api.applies and "Deployment" not in api.applies
    assert ApiError(500, "etcdserver: request timed out").transient, "other 500s are still retried"


def test_items_another_manager_added_and_values_the_server_drops_need_no_apply() -> None:
    """How a real server stores the Deployment after `kubectl set env` added TZ (server-side apply
    never removes another manager's list items) and without an env value "" (omitempty): compared
    by position and length, every pass re-applied it and posted an Updated Event."""
    spec = SPEC | {"pod": {"env": [{"name": "NO_PROXY", "value": ""}, {"name": "LOG", "value": "1"}]}}
    deployment = render_children(parse_spec(spec), Meta("svc", "ns", "u1"))[1]
    live = copy.deepcopy(deployment)
    container = live["spec"]["template"]["spec"]["containers"][0]
    kept = [{k: v for k, v in item.items() if v != ""} for item in container["env"]]
    container["env"] = [{"name": "TZ", "value": "UTC"}, *reversed(kept)]
    assert not needs_apply(deployment, live)
    next(item for item in container["env"] if item["name"] == "LOG")["value"] = "2"
    assert needs_apply(deployment, live), "a changed value of ours is still drift"
    live = copy.deepcopy(deployment)
    live["spec"]["template"]["spec"]["containers"][0]["args"].append("--extra")
    assert needs_apply(deployment, live), "lists without a merge key (args) are compared whole"


def test_an_apply_that_changed_nothing_posts_no_event() -> None:
    """A real server answers a no-op apply with the object's resourceVersion unchanged."""

    class SameVersionApi(FakeApi):
        def __init__(self, next_version: str) -> None:
            super().__init__()
            self.next_version = next_version

        def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            owners = [{"kind": c.KIND, "name": "svc", "uid": "u1", "controller": True}]
            metadata = {
                "name": name,
                "namespace": namespace,
                "resourceVersion": "7",
                "ownerReferences": owners,
            }
            return {"metadata": metadata}

        def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
            stored = super().apply(manifest)
            stored["metadata"]["resourceVersion"] = self.next_version
            return stored

    meta = Meta("svc", "ns", "u1")
    children = render_children(parse_spec(SPEC), meta)
    assert apply_children(SameVersionApi("7"), children, meta).events == []  # type: ignore[arg-type]
    updated = apply_children(SameVersionApi("8"), children, meta).events  # type: ignore[arg-type]
    assert [event.reason for event in updated] == [c.REASON_UPDATED] * len(children)


def forbidden(api_version: str, kind: str, name: str) -> ApiError:
    """A 403 as KubeApi raises it after an RBAC change, naming its request."""
    message = (
        f'{PLURALS[kind]} "{name}" is forbidden: User "system:serviceaccount:ops:operator" cannot get it'
    )
    return ApiError(403, message, request=f"GET {object_path(api_version, kind, 'ns', name)}")


def available(api: FakeApi) -> None:
    """What the Deployment controller reports once the pods are ready."""
    api.objects[("Deployment", "ns", "svc")]["status"] = {
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
        "availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}],
    }  # fmt: skip


def test_a_child_the_operator_may_no_longer_read_turns_a_ready_service_stalled() -> None:
    """A 403 on the GET of a child (the operator's RBAC changed) used to fail the pass with no
    condition written, so the service stayed Ready=True. Now it is Stalled/ApiError naming the
    request and the HTTP status, with one Warning; the replicas the status last saw stay (the scale
    subresource reads them); and the pass after the RBAC is fixed clears it."""
    api = FakeApi()
    status: dict[str, Any] = {}
    status.update(reconcile_service(api, body(SPEC), "img").status_delta)  # type: ignore[arg-type]
    available(api)
    status.update(reconcile_service(api, body(SPEC, status), "img").status_delta)  # type: ignore[arg-type]
    assert ready_condition_of(status)["status"] == "True"

    api.fail_get["Deployment"] = forbidden("apps/v1", "Deployment", "svc")
    outcome = reconcile_service(api, body(SPEC, status), "img")  # type: ignore[arg-type]
    status.update(outcome.status_delta)
    conditions = {cond["type"]: cond for cond in status["conditions"]}
    assert [conditions[t]["status"] for t in ("Ready", "Reconciling", "Stalled")] == [
        "False",
        "False",
        "True",
    ]
    assert {cond["reason"] for cond in conditions.values()} == {c.REASON_API_ERROR}
    message = conditions["Stalled"]["message"]
    assert message.startswith(
        "the API server refused GET /apis/apps/v1/namespaces/ns/deployments/svc: HTTP 403: "
        'deployments "svc" is forbidden'
    ), message
    assert "operator's ServiceAccount" in message
    assert "replicas" not in outcome.status_delta and status["readyReplicas"] == 1
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", c.REASON_API_ERROR, message)
    ]
    again = reconcile_service(api, body(SPEC, status), "img")  # type: ignore[arg-type]
    assert again.status_delta == {} and again.events == [], "one Warning per episode"

    del api.fail_get["Deployment"]
    healed = reconcile_service(api, body(SPEC, status), "img")  # type: ignore[arg-type]
    status.update(healed.status_delta)
    assert (ready_condition_of(status)["status"], ready_condition_of(status)["reason"]) == (
        "True",
        c.REASON_AVAILABLE,
    )


def test_a_transient_error_reading_a_child_is_still_retried() -> None:
    api = FakeApi()
    api.fail_get["PersistentVolumeClaim"] = ApiError(503, "etcd leader changed")
    with pytest.raises(ApiError) as caught:
        reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    assert caught.value.transient


def test_an_invalid_spec_whose_children_cannot_be_read_is_stalled_api_error() -> None:
    """The invalid-spec path reads the children too (for the replicas it reports)."""
    api = FakeApi()
    api.fail_get["PersistentVolumeClaim"] = forbidden("v1", "PersistentVolumeClaim", "svc-model-cache")
    spec = {"model": {"id": "x", "pipeline": "NotARealPipeline"}}
    outcome = reconcile_service(api, body(spec), "img")  # type: ignore[arg-type]
    stalled = stalled_condition(outcome)
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_API_ERROR)
    assert "GET /api/v1/namespaces/ns/persistentvolumeclaims/svc-model-cache: HTTP 403" in stalled["message"]
