"""The Kubernetes API emulator's own tests: the apiserver semantics the operator relies on.

Emulated instead of real: kube-apiserver itself (kmock-based KubeApiEmulator over HTTP on loopback);
the requests are raw HTTP as any client would send them. The cluster tier runs against a real server.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import kmock
import pytest

from support.kube_emulator import EmulatorThread
from support.operator_harness import Client

pytestmark = pytest.mark.integration

CMS = "/apis/apps/v1/namespaces/ns/deployments"


def deployment(name: str = "web", labels: dict[str, str] | None = None, replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {"replicas": replicas}}  # fmt: skip


def test_create_fills_server_metadata_and_answers_201(client: Client) -> None:
    response = client.post(CMS, deployment())
    assert response.status_code == 201
    meta = response.json()["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1 and meta["namespace"] == "ns"


def test_duplicate_create_is_409_already_exists(client: Client) -> None:
    client.post(CMS, deployment())
    response = client.post(CMS, deployment())
    assert response.status_code == 409 and response.json()["reason"] == "AlreadyExists"


def test_missing_object_is_404_status(client: Client) -> None:
    response = client.get(CMS + "/nope")
    assert response.status_code == 404
    assert response.json()["kind"] == "Status" and response.json()["reason"] == "NotFound"


def test_generate_name(client: Client) -> None:
    response = client.post(
        "/api/v1/namespaces/ns/events", {"metadata": {"generateName": "ev-"}, "reason": "X"}
    )
    assert response.status_code == 201 and response.json()["metadata"]["name"].startswith("ev-")


def test_generation_bumps_on_spec_change_only(client: Client) -> None:
    client.post(CMS, deployment())
    labelled = client.merge_patch(CMS + "/web", {"metadata": {"labels": {"x": "y"}}}).json()
    assert labelled["metadata"]["generation"] == 1
    scaled = client.merge_patch(CMS + "/web", {"spec": {"replicas": 3}}).json()
    assert scaled["metadata"]["generation"] == 2
    assert int(scaled["metadata"]["resourceVersion"]) > int(labelled["metadata"]["resourceVersion"])


def test_no_op_patch_does_not_bump_resource_version(client: Client) -> None:
    created = client.post(CMS, deployment()).json()
    same = client.merge_patch(CMS + "/web", {"spec": {"replicas": 1}}).json()
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_status_is_a_separate_subresource(client: Client) -> None:
    client.post(CMS, deployment() | {"status": {"replicas": 9}})
    assert "status" not in client.get(CMS + "/web").json()
    ignored = client.merge_patch(CMS + "/web", {"status": {"replicas": 5}}).json()
    assert "status" not in ignored
    written = client.merge_patch(
        CMS + "/web/status", {"status": {"replicas": 5}, "spec": {"replicas": 7}}
    ).json()
    assert written["status"] == {"replicas": 5} and written["spec"]["replicas"] == 1
    assert written["metadata"]["generation"] == 1


def test_stale_resource_version_is_409_conflict(client: Client) -> None:
    created = client.post(CMS, deployment()).json()
    client.merge_patch(CMS + "/web", {"spec": {"replicas": 2}})
    stale = created["metadata"]["resourceVersion"]
    response = client.merge_patch(
        CMS + "/web", {"metadata": {"resourceVersion": stale}, "spec": {"replicas": 3}}
    )
    assert response.status_code == 409 and response.json()["reason"] == "Conflict"
    put = client.request("PUT", CMS + "/web", json=created)
    assert put.status_code == 409


def test_put_with_current_resource_version_replaces(client: Client) -> None:
    created = client.post(CMS, deployment()).json()
    created["spec"]["replicas"] = 4
    response = client.request("PUT", CMS + "/web", json=created)
    assert response.status_code == 200 and response.json()["spec"]["replicas"] == 4


def test_json_patch(client: Client) -> None:
    client.post(CMS, deployment())
    response = client.request(
        "PATCH", CMS + "/web", data=json.dumps([{"op": "replace", "path": "/spec/replicas", "value": 6}]),
        headers={"Content-Type": "application/json-patch+json"},
    )  # fmt: skip
    assert response.json()["spec"]["replicas"] == 6


def test_label_selectors_filter_lists(client: Client) -> None:
    client.post(CMS, deployment("a", {"tier": "gpu", "team": "x"}))
    client.post(CMS, deployment("b", {"tier": "cpu"}))
    client.post(CMS, deployment("c", {"team": "x"}))

    def names(selector: str) -> list[str]:
        items = client.get(CMS, params={"labelSelector": selector}).json()["items"]
        return [item["metadata"]["name"] for item in items]

    assert names("tier=gpu") == ["a"]
    assert names("tier!=gpu") == ["b", "c"]
    assert names("tier in (gpu,cpu)") == ["a", "b"]
    assert names("tier notin (gpu)") == ["b", "c"]
    assert names("team") == ["a", "c"]
    assert names("!tier") == ["c"]
    assert names("team=x,tier=gpu") == ["a"]


def test_list_is_namespaced_or_cluster_wide(client: Client) -> None:
    client.post(CMS, deployment("a"))
    client.post("/apis/apps/v1/namespaces/other/deployments", deployment("b"))
    assert len(client.get(CMS).json()["items"]) == 1
    assert len(client.get("/apis/apps/v1/deployments").json()["items"]) == 2


def _watch(
    client: Client, params: dict[str, str], events: list[dict[str, Any]], path: str = CMS
) -> threading.Thread:
    def run() -> None:
        with client.get(path, params={"watch": "true", **params}, stream=True) as response:
            for line in response.iter_lines():
                if line:
                    events.append(json.loads(line))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_watch_from_resource_version_replays_later_changes_only(client: Client) -> None:
    client.post(CMS, deployment("before"))
    listed = client.get(CMS).json()["metadata"]["resourceVersion"]
    client.post(CMS, deployment("after"))
    client.merge_patch(CMS + "/before", {"spec": {"replicas": 2}})
    events: list[dict[str, Any]] = []
    thread = _watch(client, {"resourceVersion": listed, "timeoutSeconds": "2"}, events)
    _wait_for(lambda: len(events) >= 2)
    client.delete(CMS + "/after")
    thread.join(5)
    seen = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
    assert seen == [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after")]


def test_watch_without_resource_version_starts_with_the_current_state(client: Client) -> None:
    client.post(CMS, deployment("a", {"x": "1"}))
    client.post(CMS, deployment("b", {"x": "2"}))
    events: list[dict[str, Any]] = []
    thread = _watch(client, {"labelSelector": "x=1", "timeoutSeconds": "1"}, events)
    thread.join(5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a")]


def test_watch_from_a_compacted_resource_version_is_410_gone(
    client: Client, emulator: EmulatorThread
) -> None:
    emulator.emulator._compacted = 100
    events: list[dict[str, Any]] = []
    _watch(client, {"resourceVersion": "5"}, events).join(5)
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_owner_reference_garbage_collection_cascades(client: Client) -> None:
    owner = client.post(CMS, deployment("owner")).json()
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": owner["metadata"]["uid"]}
    child = client.post(
        "/api/v1/namespaces/ns/services", {"metadata": {"name": "child", "ownerReferences": [ref]}}
    )
    grand_ref = {
        "apiVersion": "v1",
        "kind": "Service",
        "name": "child",
        "uid": child.json()["metadata"]["uid"],
    }
    client.post("/api/v1/namespaces/ns/persistentvolumeclaims",
                {"metadata": {"name": "grandchild", "ownerReferences": [grand_ref]}})  # fmt: skip
    client.post("/api/v1/namespaces/ns/persistentvolumeclaims", {"metadata": {"name": "unowned"}})
    assert client.delete(CMS + "/owner").status_code == 200
    assert client.get("/api/v1/namespaces/ns/services/child").status_code == 404
    assert client.get("/api/v1/namespaces/ns/persistentvolumeclaims/grandchild").status_code == 404
    assert client.get("/api/v1/namespaces/ns/persistentvolumeclaims/unowned").status_code == 200


def test_a_dependent_created_after_its_owner_was_deleted_is_collected(client: Client) -> None:
    """A controller that read the owner just before its deletion recreates a child; the real garbage
    collector deletes it since its owner's uid no longer exists."""
    owner = client.post(CMS, deployment("owner")).json()
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": owner["metadata"]["uid"]}
    assert client.delete(CMS + "/owner").status_code == 200
    late = client.post(
        "/api/v1/namespaces/ns/services", {"metadata": {"name": "late", "ownerReferences": [ref]}}
    )
    assert late.status_code == 201
    assert client.get("/api/v1/namespaces/ns/services/late").status_code == 404


def test_orphan_propagation_keeps_dependents(client: Client) -> None:
    owner = client.post(CMS, deployment("owner")).json()
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": owner["metadata"]["uid"]}
    client.post("/api/v1/namespaces/ns/services", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    client.delete(CMS + "/owner", params={"propagationPolicy": "Orphan"})
    kept = client.get("/api/v1/namespaces/ns/services/child")
    assert kept.status_code == 200 and "ownerReferences" not in kept.json()["metadata"]


def test_finalizers_hold_deletion_until_removed(client: Client) -> None:
    client.post(CMS, deployment() | {"metadata": {"name": "web", "finalizers": ["x/y"]}})
    marked = client.delete(CMS + "/web").json()
    assert marked["metadata"]["deletionTimestamp"]
    assert client.get(CMS + "/web").status_code == 200
    client.merge_patch(CMS + "/web", {"metadata": {"finalizers": None}})
    assert client.get(CMS + "/web").status_code == 404


def test_server_side_apply_creates_merges_and_prunes_fields_of_its_manager(client: Client) -> None:
    intent = deployment() | {"metadata": {"name": "web", "namespace": "ns", "labels": {"a": "1", "b": "2"}}}
    created = client.apply(CMS + "/web", intent, manager="op")
    assert created.status_code == 201
    client.merge_patch(CMS + "/web", {"metadata": {"labels": {"by-hand": "yes"}}})
    intent["metadata"]["labels"] = {"a": "1"}
    applied = client.apply(CMS + "/web", intent, manager="op").json()
    assert applied["metadata"]["labels"] == {"a": "1", "by-hand": "yes"}


def test_server_side_apply_of_an_unchanged_intent_writes_nothing(
    client: Client, emulator: EmulatorThread
) -> None:
    intent = deployment() | {"metadata": {"name": "web", "namespace": "ns"}}
    first = client.apply(CMS + "/web", intent, manager="op").json()
    writes = len(emulator.emulator.writes)
    again = client.apply(CMS + "/web", intent, manager="op").json()
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert again["metadata"]["generation"] == 1
    assert len(emulator.emulator.writes) == writes


def test_server_side_apply_needs_a_field_manager(client: Client) -> None:
    response = client.request(
        "PATCH", CMS + "/web", data="{}", headers={"Content-Type": "application/apply-patch+yaml"}
    )
    assert response.status_code == 422


def test_applying_a_crd_serves_its_resource_in_discovery(client: Client) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "things.example.com"},
           "spec": {"group": "example.com", "scope": "Namespaced",
                    "names": {"plural": "things", "kind": "Thing"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "subresources": {"status": {}}}]}}  # fmt: skip
    assert client.get("/apis/example.com/v1/namespaces/ns/things").status_code == 404
    client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    resources = client.get("/apis/example.com/v1").json()["resources"]
    assert {r["name"] for r in resources} == {"things", "things/status"}
    assert (
        client.post("/apis/example.com/v1/namespaces/ns/things", {"metadata": {"name": "t"}}).status_code
        == 201
    )


def test_injected_faults_answer_before_any_state_change(client: Client, emulator: EmulatorThread) -> None:
    emulator.emulator["post", kmock.resource("apps", "v1", "deployments")] << 503
    assert client.post(CMS, deployment()).status_code == 503
    assert client.get(CMS + "/web").status_code == 404


def test_namespaces_are_a_cluster_scoped_resource(client: Client) -> None:
    assert client.post("/api/v1/namespaces", {"metadata": {"name": "team-a"}}).status_code == 201
    assert client.get("/api/v1/namespaces/team-a").json()["metadata"]["name"] == "team-a"
    assert [n["metadata"]["name"] for n in client.get("/api/v1/namespaces").json()["items"]] == ["team-a"]
    assert client.get("/api/v1/namespaces/team-a/services").json()["items"] == []


def test_status_codes_stay_per_request_after_a_create(client: Client) -> None:
    intent = deployment() | {"metadata": {"name": "web", "namespace": "ns"}}
    assert client.apply(CMS + "/web", intent, manager="op").status_code == 201
    assert client.merge_patch(CMS + "/web", {"spec": {"replicas": 2}}).status_code == 200
    assert client.apply(CMS + "/web", intent, manager="op").status_code == 200
