"""Helpers to check manifests against the CRD's openAPIV3Schema the way kube-apiserver does.

Emulated, not real: structural defaulting and CEL evaluation are reimplemented here (jsonschema for the
OpenAPI keywords, cel-python for x-kubernetes-validations); the cluster tier checks real admission.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "imagediffusion.dev_imagediffusionservices.yaml"
SAMPLES = sorted((REPO / "crds" / "samples").glob("*.yaml"))


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def load_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: fill `default`s of absent properties, recursively (as the apiserver does)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in (schema.get("properties") or {}):
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _cel_failures(schema: dict[str, Any], value: Any, old: Any, env: celpy.Environment) -> list[str]:
    failures: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or ():
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules run on updates only
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate(activation)
        if not isinstance(result, celpy.celtypes.BoolType) or not bool(result):
            failures.append(rule["message"])
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                old_sub = old.get(key) if isinstance(old, dict) else None
                failures += _cel_failures(sub, value[key], old_sub, env)
    return failures


def admission_errors(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Why the apiserver would reject `manifest` (empty: admitted): defaults, then schema, then CEL."""
    schema = load_schema()
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    old_obj = apply_defaults(schema, copy.deepcopy(old)) if old is not None else None
    errors = [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(obj)]
    if errors:
        return errors
    return _cel_failures(schema, obj, old_obj, celpy.Environment())


def load_sample(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data
