"""values.yaml and values.schema.json: every key documented, bad values rejected by helm itself."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml

from support.chart import CHART
from support.idsvc_schema import admission_errors

VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"


def test_default_values_satisfy_the_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(VALUES.read_text()))


def test_every_values_key_has_a_comment() -> None:
    """Each chart key (one the schema declares) has a comment on the line above it.

    Keys inside Kubernetes objects passed through as they are (resources, securityContext, ...) are
    those objects' defaults, documented by the Kubernetes API, and are not checked.
    """
    schema = json.loads(SCHEMA.read_text())
    lines = VALUES.read_text().splitlines()
    stack: list[tuple[int, dict[str, Any] | None]] = [(-1, schema)]  # (indent, schema of that mapping)
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        declared = parent.get("properties", {}) if parent else {}
        if key in declared:
            if not lines[number - 1].strip().startswith("#"):
                missing.append(f"{number + 1}: {line.strip()}")
            stack.append((indent, declared[key]))
        else:
            stack.append((indent, None))
    assert not missing, "values.yaml keys without a comment:\n" + "\n".join(missing)


def test_every_schema_object_rejects_unknown_keys() -> None:
    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
            for key, value in node.get("properties", {}).items():
                walk(value, f"{path}.{key}".lstrip("."))
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")

    walk(json.loads(SCHEMA.read_text()), "")


BAD_VALUES = {
    "unknown top-level key": ["--set", "replicaCount=2"],
    "unknown nested key": ["--set", "operator.image.name=x"],
    "misspelt section": ["--set", "operater.enabled=false"],
    "port as text": ["--set-string", "operator.livenessPort=http"],
    "port out of range": ["--set", "operator.livenessPort=70000"],
    "log format not in enum": ["--set", "operator.logFormat=xml"],
    "pull policy not in enum": ["--set", "operator.image.pullPolicy=Sometimes"],
    "namespace not a DNS label": ["--set", "operator.watchNamespaces={Team_A}"],
    "watchNamespaces as a string": ["--set", "operator.watchNamespaces=team-a"],
    "bad digest": ["--set", "worker.image.digest=latest"],
    "crds.enabled as text": ["--set-string", "crds.enabled=yes"],
    "fleet service without spec": ["--set", "fleet.services[0].name=x"],
    "fleet service with a bad name": [
        "--set", "fleet.services[0].name=X_1", "--set", "fleet.services[0].spec.replicas=1",
    ],
    "fleet service name starting with a digit": [
        "--set", "fleet.services[0].name=1sdxl", "--set", "fleet.services[0].spec.replicas=1",
    ],
    "fleet service name over 52 characters": [
        "--set", f"fleet.services[0].name={'a' * 53}", "--set", "fleet.services[0].spec.replicas=1",
    ],
    "fleet service unknown key": [
        "--set", "fleet.services[0].name=x", "--set", "fleet.services[0].spec.replicas=1",
        "--set", "fleet.services[0].replicas=1",
    ],
    # helm drops a null before checking the schema; `required` catches what the templates need.
    **{f"{key} null": ["--set", f"{key}=null"] for key in (
        "crds", "operator", "worker", "operator.image", "operator.livenessProbe", "operator.serviceAccount",
        "operator.rbac", "operator.logFormat", "operator.livenessPort", "worker.image", "worker.podMonitor",
    )},
    # Keys the selectors and Helm's ownership rely on stay the chart's.
    **{
        f"{where} sets {key}": ["--set", f"{where}.{key.replace('.', chr(92) + '.')}=x"]
        for where in ("commonLabels", "operator.podLabels", "worker.podMonitor.labels", "fleet.labels")
        for key in (f"app.kubernetes.io/{name}" for name in ("instance", "component", "managed-by"))
    },
    "fleet service label sets app.kubernetes.io/name": [
        "--set", "fleet.services[0].name=x", "--set", "fleet.services[0].spec.replicas=1",
        "--set", "fleet.services[0].labels.app\\.kubernetes\\.io/name=x",
    ],
    "label value over 63 characters": ["--set", f"commonLabels.team={'a' * 64}"],
    "label value with a space": ["--set", "commonLabels.team=a b"],
    "label key with a space": ["--set", "commonLabels.a b=x"],
    "scrape interval not a duration": ["--set", "worker.podMonitor.interval=30"],
    "scrape timeout empty": ["--set", "worker.podMonitor.scrapeTimeout="],
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_helm_rejects_bad_values(helm: str, case: str) -> None:
    result = subprocess.run(
        [helm, "template", "x", str(CHART), *BAD_VALUES[case]], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0, f"{case}: helm accepted it"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


# Either side of each part of the CRD's rule: DNS-1035 (a letter first, no dash last), at most 52.
SERVICE_NAMES = ["a", "sd-xl-2", "a" * 52, "a" * 53, "a" * 63, "1sdxl", "-a", "a-", "Sdxl", "sd.xl", "sd_xl"]


@pytest.mark.parametrize("name", SERVICE_NAMES, ids=lambda name: f"a*{len(name)}" if len(name) > 9 else name)
def test_fleet_service_name_rule_is_the_crds(name: str) -> None:
    """The schema takes a fleet service name exactly when the API server would admit the object."""
    schema = json.loads(SCHEMA.read_text())["properties"]["fleet"]["properties"]["services"]["items"]
    schema_takes = jsonschema.Draft7Validator(schema["properties"]["name"]).is_valid(name)
    service = {
        "apiVersion": "imagediffusion.dev/v1alpha1",
        "kind": "ImageDiffusionService",
        "metadata": {"name": name},
        "spec": {"model": {"id": "builtin:tiny-sd"}},
    }
    crd_takes = admission_errors(service) == []
    assert schema_takes == crd_takes, f"{name!r}: values schema takes it: {schema_takes}, CRD: {crd_takes}"
