"""`helm template` output: valid Kubernetes objects, the operator Deployment, modes, CRDs, fleet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from diffusion_operator.render import render_deployment
from diffusion_operator.spec import Meta, parse_spec
from support.chart import CHART, RELEASE, RELEASE_NAMESPACE, SCENARIOS, Manifest, Render
from support.idsvc_schema import admission_errors

pytestmark = pytest.mark.integration

# The oldest Kubernetes the chart declares support for, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.utils.latest_version())
FULLNAME = f"{RELEASE}-image-diffusion-operator"


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(objects: list[Manifest]) -> Manifest:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(container: Manifest) -> dict[str, Any]:
    return {item["name"]: item.get("value") for item in container["env"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid(
    render: Render, validate_custom_resource: Callable[[Manifest], None], scenario: str, version: str
) -> None:
    objects = render(*SCENARIOS[scenario])
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("imagediffusion.dev/"):
            validate_custom_resource(obj)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_an_unknown_field(render: Render) -> None:
    """Guards the test above: the offline validator must really be strict."""
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_crd_schema_validation_rejects_an_unknown_spec_field(
    validate_custom_resource: Callable[[Manifest], None],
) -> None:
    bad = {
        "apiVersion": "imagediffusion.dev/v1alpha1",
        "kind": "ImageDiffusionService",
        "metadata": {"name": "bad"},
        "spec": {"model": {"id": "builtin:tiny-sd"}, "gpu": 1},
    }
    with pytest.raises(AssertionError, match="gpu"):
        validate_custom_resource(bad)


SAMPLES = sorted((CHART.parents[1] / "crds" / "samples").glob("*.yaml"))


@pytest.mark.parametrize("sample", SAMPLES, ids=[path.name for path in SAMPLES])
def test_repository_samples_pass_the_same_crd_validation(
    validate_custom_resource: Callable[[Manifest], None], sample: Path
) -> None:
    for obj in yaml.safe_load_all(sample.read_text()):
        validate_custom_resource(obj)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_carries_the_standard_labels(render: Render, scenario: str) -> None:
    for obj in render(*SCENARIOS[scenario]):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, obj["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"] in {"operator", "crds", "users", "fleet"}


def test_operator_runs_one_instance_with_recreate(render: Render) -> None:
    spec = one(render(), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_operator_command_env_and_images(render: Render) -> None:
    container = operator_container(render())
    assert container["command"] == ["python", "-m", "diffusion_operator"]
    assert container["image"] == "ghcr.io/image-diffusion-operator/operator:0.1.0"
    assert env_of(container) == {
        "DIFFUSION_OPERATOR_NAMESPACES": "",
        "DIFFUSION_OPERATOR_LIVENESS_PORT": "8080",
        "DIFFUSION_OPERATOR_WORKER_IMAGE": "ghcr.io/image-diffusion-operator/worker:0.1.0",
        "DIFFUSION_OPERATOR_LOG_FORMAT": "json",
        "DIFFUSION_OPERATOR_POD_IP": None,  # from status.podIP (valueFrom)
    }


def test_image_values_tag_digest_and_cpu_worker(render: Render) -> None:
    digest = "sha256:" + "ab" * 32
    objects = render(
        "--set", f"operator.image.digest={digest}",
        "--set", "worker.image.tag=0.1.0-cpu",
        "--set", "worker.image.repository=registry.local/worker",
    )  # fmt: skip
    container = operator_container(objects)
    assert container["image"] == f"ghcr.io/image-diffusion-operator/operator@{digest}"
    assert env_of(container)["DIFFUSION_OPERATOR_WORKER_IMAGE"] == "registry.local/worker:0.1.0-cpu"


def test_liveness_probe_targets_the_kopf_endpoint_on_the_configured_port(render: Render) -> None:
    container = operator_container(render("--set", "operator.livenessPort=9090"))
    assert container["ports"] == [{"name": "healthz", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert env_of(container)["DIFFUSION_OPERATOR_LIVENESS_PORT"] == "9090"
    # kopf listens on the family of the pod's IP, which the probe targets (IPv6-only clusters too).
    pod_ip = next(item for item in container["env"] if item["name"] == "DIFFUSION_OPERATOR_POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_operator_pod_is_locked_down(render: Render) -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == FULLNAME
    assert container["resources"]["limits"]["memory"]


def test_cluster_wide_mode_uses_a_cluster_role_binding(render: Render) -> None:
    objects = render()
    assert not by_kind(objects, "Role")
    assert not by_kind(objects, "RoleBinding")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == FULLNAME
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]


def test_namespaced_mode_binds_a_role_in_each_watched_namespace(render: Render) -> None:
    objects = render(*SCENARIOS["namespaced"])
    assert env_of(operator_container(objects))["DIFFUSION_OPERATOR_NAMESPACES"] == "team-a,team-b"
    assert sorted(role["metadata"]["namespace"] for role in by_kind(objects, "Role")) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    # Only kopf's read-only discovery stays cluster-wide.
    cluster_role = next(r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == FULLNAME)
    assert {res for rule in cluster_role["rules"] for res in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in cluster_role["rules"])


def test_strict_namespaced_mode_has_no_cluster_scoped_rbac(render: Render) -> None:
    objects = render(*SCENARIOS["strict-namespaced"])
    assert not by_kind(objects, "ClusterRole")
    assert not by_kind(objects, "ClusterRoleBinding")
    assert len(by_kind(objects, "Role")) == 2


def test_crd_is_kept_on_uninstall_by_default_and_can_be_skipped(render: Render) -> None:
    crd = one(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "Prune=false"
    unkept = one(render("--set", "crds.keep=false"), "CustomResourceDefinition")
    assert not unkept["metadata"].get("annotations", {}).keys() & {
        "helm.sh/resource-policy",
        "argocd.argoproj.io/sync-options",
    }
    assert not by_kind(render("--set", "crds.enabled=false"), "CustomResourceDefinition")


def test_rendered_crd_is_the_repository_crd_plus_chart_metadata(render: Render, crd: Manifest) -> None:
    rendered = one(render(), "CustomResourceDefinition")
    assert rendered["spec"] == crd["spec"]
    assert rendered["metadata"]["name"] == crd["metadata"]["name"]
    assert crd["metadata"].get("labels", {}).items() <= rendered["metadata"]["labels"].items()
    assert set(rendered["metadata"]) - {"labels", "annotations"} == set(crd["metadata"]) - {
        "labels",
        "annotations",
    }


def test_fleet_services_merge_defaults_under_their_own_spec(render: Render) -> None:
    services = {
        svc["metadata"]["name"]: svc for svc in by_kind(render(*SCENARIOS["fleet"]), "ImageDiffusionService")
    }
    assert set(services) == {"tiny", "sdxl"}
    tiny, sdxl = services["tiny"], services["sdxl"]
    assert tiny["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert sdxl["metadata"]["namespace"] == "team-a"
    # A service's own value wins, even a zero the fleet default would otherwise overwrite.
    assert tiny["spec"]["resources"]["gpus"] == 0
    assert tiny["spec"]["replicas"] == 1
    assert sdxl["spec"]["resources"]["gpus"] == 1
    assert sdxl["spec"]["replicas"] == 2
    assert sdxl["metadata"]["labels"]["fleet"] == "imaging"
    assert sdxl["metadata"]["labels"]["tier"] == "gold"
    assert (
        tiny["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
        == "SkipDryRunOnMissingResource=true"
    )


def test_fleet_only_release_renders_only_the_services(render: Render) -> None:
    kinds = {obj["kind"] for obj in render(*SCENARIOS["fleet-only"])}
    assert kinds == {"ImageDiffusionService"}


CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.mark.parametrize("values", CI_VALUES, ids=[path.name for path in CI_VALUES])
def test_ci_values_render_services_the_api_server_admits(render: Render, values: Path) -> None:
    """Defaults, schema and CEL rules: the structural check above misses a CEL rule such as
    "replicas > 1 share one model-cache PVC", which would fail the install."""
    for svc in by_kind(render("-f", str(values)), "ImageDiffusionService"):
        assert admission_errors(svc) == [], f"{values.name}: {svc['metadata']['name']}"


def test_ci_values_declare_services_to_check(render: Render) -> None:
    """Guards the test above: some ci/ values file must render services for it to check."""
    assert any(by_kind(render("-f", str(values)), "ImageDiffusionService") for values in CI_VALUES)


def test_notes_example_service_passes_the_crd_schema(
    validate_custom_resource: Callable[[Manifest], None],
) -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    heredoc = notes.split("<<'YAML'\n", 1)[1].split("\n  YAML", 1)[0]
    assert "{{" not in heredoc
    validate_custom_resource(yaml.safe_load("\n".join(line[2:] for line in heredoc.splitlines())))


def test_pod_monitor_selects_the_worker_pods_the_operator_renders(render: Render) -> None:
    """Off by default (it needs prometheus-operator's CRD); when on, its selector matches the labels
    of the pods the operator really renders, on the port that serves /metrics."""
    assert not by_kind(render(), "PodMonitor")
    monitor = one(
        render("--set", "worker.podMonitor.enabled=true", "--set", "worker.podMonitor.labels.release=prom"),
        "PodMonitor",
    )
    pod = render_deployment(parse_spec({"model": {"id": "builtin:tiny-sd"}}), Meta("svc", "team-a", "uid"))[
        "spec"
    ]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(render(*SCENARIOS["namespaced"], "--set", "worker.podMonitor.enabled=true"), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"]["matchNames"] == ["team-a", "team-b"]
