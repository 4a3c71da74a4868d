"""Reconcile: apply only what differs, report events, and turn invalid specs into Stalled without children.

Emulated instead of real: the API server is an in-memory fake of KubeApi (get/apply) here; the
integration tier runs the same code over HTTP against the emulator.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from diffusion_operator import constants as c
from diffusion_operator.kube import ApiError
from diffusion_operator.reconcile import is_subset, needs_apply, reconcile_service
from diffusion_operator.render import render_children
from diffusion_operator.spec import Meta, parse_spec


class FakeApi:
    """Stores applied objects, adds server-side defaults, counts writes."""

    def __init__(self, fail_apply: ApiError | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.applies: list[str] = []
        self.fail_apply = fail_apply

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found else None

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.fail_apply is not None:
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
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "Service"]
    assert [e.reason for e in outcome.events] == ["Created"] * 3
    reconciling = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Reconciling")
    assert reconciling["status"] == "True"
    assert outcome.status_delta["observedGeneration"] == 1


def test_second_pass_with_same_spec_writes_nothing() -> None:
    api = FakeApi()
    first = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    second = reconcile_service(api, body(SPEC, first.status_delta), "img")  # type: ignore[arg-type]
    assert api.applies == ["PersistentVolumeClaim", "Deployment", "Service"]
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


def test_rejected_child_is_stalled_apply_failed() -> None:
    api = FakeApi(
        fail_apply=ApiError(422, "spec.resources.requests.storage: field can not be less than previous")
    )
    outcome = reconcile_service(api, body(SPEC), "img")  # type: ignore[arg-type]
    stalled = next(x for x in outcome.status_delta["conditions"] if x["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", c.REASON_APPLY_FAILED)
    assert [e.reason for e in outcome.events] == [c.REASON_APPLY_FAILED]
