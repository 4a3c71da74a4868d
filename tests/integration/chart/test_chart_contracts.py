"""What the chart tells the operator matches what the operator reads: module, env, images, version."""

from __future__ import annotations

import importlib.util
import re
import tomllib

import pytest
import yaml

from support.chart import CHART, REPO, Render

OPERATOR_PACKAGE = REPO / "operator" / "diffusion_operator"
needs_operator_package = pytest.mark.skipif(
    not (OPERATOR_PACKAGE / "__init__.py").exists(),
    reason="the operator package is not in this checkout yet (it lands with branch `operator`)",
)


def package_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def test_chart_and_app_versions_follow_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == package_version()
    assert chart["appVersion"] == package_version()


def test_makefile_builds_the_images_the_chart_deploys() -> None:
    makefile = (REPO / "Makefile").read_text()
    registry = re.search(r"^IMAGE_REGISTRY \?= (\S+)$", makefile, re.MULTILINE)
    assert registry is not None
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["image"]["repository"] == f"{registry.group(1)}/operator"
    assert values["worker"]["image"]["repository"] == f"{registry.group(1)}/worker"


def rendered_command(render: Render) -> list[str]:
    deployment = next(obj for obj in render() if obj["kind"] == "Deployment")
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["command"])


@pytest.mark.integration
def test_rendered_operator_command_runs_a_python_module(render: Render) -> None:
    command = rendered_command(render)
    assert command[:2] == ["python", "-m"]
    assert len(command) == 3


@pytest.mark.integration
@needs_operator_package
def test_rendered_operator_command_refers_to_a_module_that_exists(render: Render) -> None:
    module = rendered_command(render)[2]
    spec = importlib.util.find_spec(f"{module}.__main__")
    assert spec is not None, f"`python -m {module}` would fail: no {module}/__main__.py"
    assert spec.origin is not None
    assert spec.origin.startswith(str(REPO)), f"{module} resolved outside this repository: {spec.origin}"


@pytest.mark.integration
@needs_operator_package
def test_every_env_var_the_chart_sets_is_read_by_the_operator(render: Render) -> None:
    deployment = next(obj for obj in render() if obj["kind"] == "Deployment")
    names = [item["name"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]]
    source = "\n".join(path.read_text() for path in OPERATOR_PACKAGE.rglob("*.py"))
    unread = [name for name in names if f'"{name}"' not in source]
    assert not unread, f"the chart sets {unread} but the operator never reads them"


@needs_operator_package
def test_chart_default_worker_image_is_the_operators_default() -> None:
    constants = importlib.import_module("diffusion_operator.constants")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_default = (
        f"{values['worker']['image']['repository']}:{values['worker']['image']['tag'] or package_version()}"
    )
    assert chart_default == constants.DEFAULT_WORKER_IMAGE
