"""The chart's RBAC: exactly the operator's needs, no wildcards, no Secrets, in every mode."""

from __future__ import annotations

import pytest

from support.chart import SCENARIOS, Manifest, Render

pytestmark = pytest.mark.integration

RBAC_KINDS = {"ClusterRole", "Role"}
# The contract agreed with the operator: (apiGroup, resource) -> verbs.
# test_chart_rbac_matches_operator.py checks it against what the operator really calls.
CHILD_VERBS = {"get", "list", "watch", "create", "patch"}  # server-side apply; no update or delete
OPERATOR_NEEDS = {
    ("imagediffusion.dev", "imagediffusionservices"): {"get", "list", "watch", "patch"},
    ("imagediffusion.dev", "imagediffusionservices/status"): {"get", "patch"},
    ("imagediffusion.dev", "imagediffusionservices/finalizers"): {"update"},
    ("apps", "deployments"): CHILD_VERBS,
    ("", "services"): CHILD_VERBS,
    ("", "persistentvolumeclaims"): CHILD_VERBS,
    ("policy", "poddisruptionbudgets"): CHILD_VERBS,
    ("", "events"): {"create", "patch"},
    ("", "pods"): {"list", "watch"},  # read only: why a worker is not ready
}
KOPF_DISCOVERY = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def grants(role: Manifest) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs granted by one Role or ClusterRole."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def roles(objects: list[Manifest]) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] in RBAC_KINDS]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_rule_uses_a_wildcard(render: Render, scenario: str) -> None:
    for role in roles(render(*SCENARIOS[scenario])):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in value for value in rule.get(field, [])), (
                    role["metadata"]["name"],
                    rule,
                )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_role_touches_secrets_or_escalates(render: Render, scenario: str) -> None:
    for role in roles(render(*SCENARIOS[scenario])):
        for (group, resource), verbs in grants(role).items():
            assert resource.split("/")[0] not in {"secrets", "serviceaccounts"}, role["metadata"]["name"]
            if resource.startswith("pods"):  # reading pods, never exec, attach, port-forward or create
                assert (resource, verbs <= {"get", "list", "watch"}) == ("pods", True), role["metadata"][
                    "name"
                ]
            assert group not in {"rbac.authorization.k8s.io", "admissionregistration.k8s.io"}
            assert not verbs & {"escalate", "bind", "impersonate"}


def test_cluster_wide_role_is_exactly_the_operator_contract(render: Render) -> None:
    operator_role = next(
        r
        for r in render()
        if r["kind"] == "ClusterRole" and r["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )
    assert grants(operator_role) == OPERATOR_NEEDS | KOPF_DISCOVERY


def test_namespaced_roles_are_exactly_the_operator_contract(render: Render) -> None:
    namespaced = [r for r in render(*SCENARIOS["namespaced"]) if r["kind"] == "Role"]
    assert len(namespaced) == 2
    for role in namespaced:
        assert grants(role) == OPERATOR_NEEDS


def test_user_roles_aggregate_read_to_view_and_write_to_edit(render: Render) -> None:
    user_roles = {r["metadata"]["name"].rsplit("-", 1)[1]: r for r in render() if r["kind"] == "ClusterRole"
                  and r["metadata"]["labels"]["app.kubernetes.io/component"] == "users"}  # fmt: skip
    assert set(user_roles) == {"view", "edit"}
    view_labels = user_roles["view"]["metadata"]["labels"]
    edit_labels = user_roles["edit"]["metadata"]["labels"]
    assert view_labels["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit_labels
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert all(verbs <= {"get", "list", "watch"} for verbs in grants(user_roles["view"]).values())


def aggregated_grants(objects: list[Manifest], built_in_role: str) -> dict[tuple[str, str], set[str]]:
    """What the chart's user ClusterRoles add to a built-in role (view, edit or admin) by aggregation."""
    label = f"rbac.authorization.k8s.io/aggregate-to-{built_in_role}"
    granted: dict[tuple[str, str], set[str]] = {}
    for role in objects:
        if role["kind"] == "ClusterRole" and role["metadata"]["labels"].get(label) == "true":
            for key, verbs in grants(role).items():
                granted.setdefault(key, set()).update(verbs)
    return granted


def test_editors_and_admins_can_scale_services_and_viewers_can_read_the_scale(render: Render) -> None:
    """`kubectl scale idsvc` reads and writes the CRD's scale subresource, not the service itself."""
    scale = ("imagediffusion.dev", "imagediffusionservices/scale")
    objects = render()
    assert aggregated_grants(objects, "view").get(scale) == {"get"}
    for built_in_role in ("edit", "admin"):
        assert aggregated_grants(objects, built_in_role).get(scale, set()) >= {"get", "update", "patch"}, (
            built_in_role
        )
