"""Paths, values scenarios and helpers shared by the chart tests (importable by name, unlike conftest)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
