"""Paths, values scenarios and helpers shared by the chart tests (importable by name, unlike conftest)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "image-diffusion-operator"
CRD_SOURCE = REPO / "crds" / "imagediffusion.dev_imagediffusionservices.yaml"
RELEASE = "idsvc"
RELEASE_NAMESPACE = "diffusion-system"

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]

# Values files under the chart's ci/ (also used by `make helm-lint` and chart-testing).
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["-f", str(CHART / "ci" / "namespaced-values.yaml")],
    "fleet": ["-f", str(CHART / "ci" / "fleet-values.yaml")],
    "fleet-only": [
        "-f", str(CHART / "ci" / "fleet-values.yaml"),
        "--set", "operator.enabled=false", "--set", "crds.enabled=false",
    ],
    # Labels everywhere the values take them, one key shared by commonLabels and podLabels.
    "labelled": [
        "--set", "commonLabels.team=ml", "--set", "commonLabels.app\\.kubernetes\\.io/part-of=platform",
        "--set", "operator.podLabels.team=ml-operators", "--set", "operator.podLabels.tier=control",
        "-f", str(CHART / "ci" / "fleet-values.yaml"), "--set", "fleet.labels.team=ml-fleet",
    ],
    "strict-namespaced": [
        "-f", str(CHART / "ci" / "namespaced-values.yaml"),
        "--set", "operator.rbac.clusterDiscovery=false",
        "--set", "operator.rbac.aggregateToDefaultRoles=false",
    ],
}  # fmt: skip


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def structural_to_json_schema(node: Any) -> Any:
    """A CRD structural schema as JSON Schema, with kubectl's strict field validation.

    The API server prunes (kubectl --validate=strict: rejects) fields a structural schema does not
    declare; JSON Schema would accept them, so every object with declared properties is closed here.
    """
    if isinstance(node, list):
        return [structural_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: structural_to_json_schema(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; kubectl, kustomize and the API server refuse them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {duplicates}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def load_manifests(text: str) -> Iterator[Any]:
    """The documents of a `helm template` output, refusing a mapping with a key twice."""
    return yaml.load_all(text, Loader=_UniqueKeyLoader)
