"""`helm template` output: valid Kubernetes objects, the operator Deployment, modes, CRDs, fleet."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from diffusion_operator.render import render_deployment
from diffusion_operator.spec import Meta, parse_spec
from support.chart import (
    CHART,
    RELEASE,
    RELEASE_NAMESPACE,
    SCENARIOS,
    Manifest,
    Render,
    load_manifests,
    run_helm,
)
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
    # No fixed UID, GID or fsGroup: OpenShift's restricted-v2 refuses ones outside its range.
    assert not pod["securityContext"].keys() & {"runAsUser", "runAsGroup", "fsGroup"}
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


def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it. helm template skips NOTES, so a copy of the chart
    renders it through `tpl` into a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}}\n'
    )
    result = run_helm(
        helm, "template", RELEASE, str(chart), "-n", RELEASE_NAMESPACE,
        "--show-only", "templates/notes-configmap.yaml", *args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return str(yaml.safe_load(result.stdout)["data"]["notes"])


@pytest.mark.parametrize("scenario", ["default", "namespaced"])
def test_notes_example_service_runs_as_pasted(
    helm: str, tmp_path: Path, validate_custom_resource: Callable[[Manifest], None], scenario: str
) -> None:
    """Step 2 of NOTES, pasted into bash: one `kubectl apply` gets a valid service on stdin, then a
    separate `kubectl wait` runs (a stub kubectl records both; no cluster here)."""
    notes = render_notes(helm, tmp_path, *SCENARIOS[scenario])
    block = notes.split("2. Create a service.", 1)[1].split("\n3. ", 1)[0].split("\n", 1)[1]
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    calls = tmp_path / "calls"
    stdin = tmp_path / "stdin"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nif [ "$1" = apply ]; then cat > {stdin}; fi\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", "-c", block], env={"PATH": f"{stub.parent}:/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stderr, result.stderr
    namespace = "default" if scenario == "default" else "team-a"
    assert calls.read_text().splitlines() == [
        f"apply -n {namespace} -f -",
        f"-n {namespace} wait --for=condition=Ready imagediffusionservice/tiny --timeout=10m",
    ]
    [service] = [doc for doc in yaml.safe_load_all(stdin.read_text()) if doc]
    validate_custom_resource(service)
    assert service["metadata"]["name"] == "tiny"


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


def test_labels_appear_once_and_pod_labels_keep_the_selector(render: Render) -> None:
    """commonLabels, podLabels and the PodMonitor's and fleet's labels are merged, one key each (the
    render fixture refuses a duplicate key, as kubectl and kustomize do), later layers winning."""
    monitor = ["--set", "worker.podMonitor.enabled=true", "--set", "worker.podMonitor.labels.team=ml-metrics"]
    objects = render(*SCENARIOS["labelled"], *monitor)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "platform", obj["kind"]
        assert labels["app.kubernetes.io/component"] in {"operator", "crds", "users", "fleet", "worker"}
        assert labels["app.kubernetes.io/managed-by"] == "Helm", obj["kind"]
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["labels"]["team"] == "ml"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["team"] == "ml-operators"
    assert pod_labels["tier"] == "control"
    assert one(objects, "PodMonitor")["metadata"]["labels"]["team"] == "ml-metrics"
    services = by_kind(objects, "ImageDiffusionService")
    assert {svc["metadata"]["labels"]["team"] for svc in services} == {"ml-fleet"}


def test_render_refuses_a_duplicate_key() -> None:
    """Guards the test above: the loader behind the render fixture really refuses a key twice."""
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        list(load_manifests("metadata:\n  labels:\n    team: a\n    team: b\n"))


def test_namespaced_operator_refuses_fleet_services_it_would_not_watch(helm: str) -> None:
    """A fleet service outside operator.watchNamespaces would never get a status (Argo CD would
    wait on it forever): the render fails and says which service and namespace."""
    args = [*SCENARIOS["namespaced"], *SCENARIOS["fleet"]]
    result = run_helm(helm, "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *args)
    assert result.returncode != 0
    assert f"in namespace {RELEASE_NAMESPACE}, which this release's operator does not watch" in result.stderr
    inside = ["-n", "team-a", *args, "--set", "fleet.services[0].namespace=team-b"]
    watched = run_helm(helm, "template", RELEASE, str(CHART), *inside)
    assert watched.returncode == 0, watched.stderr


@pytest.mark.parametrize(
    ("interval", "timeout", "renders"),
    [("1m30s", "1m", True), ("1m", "60000ms", True), ("1m", "60001ms", False), ("10s", "1m", False)],
)
def test_pod_monitor_durations(helm: str, interval: str, timeout: str, renders: bool) -> None:
    """Prometheus durations as prometheus-operator takes them; a scrape timeout longer than the
    interval, which Prometheus refuses, fails the render instead of dropping the scrape silently."""
    monitor = {"enabled": "true", "interval": interval, "scrapeTimeout": timeout}
    sets = [arg for key, value in monitor.items() for arg in ("--set", f"worker.podMonitor.{key}={value}")]
    result = run_helm(helm, "template", RELEASE, str(CHART), *sets)
    if renders:
        assert result.returncode == 0, result.stderr
        monitor = one([doc for doc in load_manifests(result.stdout) if doc], "PodMonitor")
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)
    else:
        assert "is longer than worker.podMonitor.interval" in result.stderr
