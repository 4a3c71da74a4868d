"""The Dockerfiles: entrypoints that exist, non-root users, pinned torch, the worker's port and cache."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from diffusion_worker.cli import build_parser
from diffusion_worker.settings import ENV_PREFIX, WorkerSettings

REPO = Path(__file__).resolve().parents[3]
WORKER_DOCKERFILE = REPO / "worker" / "Dockerfile"
OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"


def final_stage(dockerfile: Path) -> list[str]:
    """Instructions of the last stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


def instruction(stage: list[str], name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0].upper() == name]


def exec_form(stage: list[str], name: str) -> list[str]:
    values = instruction(stage, name)
    assert len(values) == 1, f"expected one {name}"
    return list(json.loads(values[0]))


@pytest.mark.parametrize(
    ("dockerfile", "module"),
    [(WORKER_DOCKERFILE, "diffusion_worker"), (OPERATOR_DOCKERFILE, "diffusion_operator")],
)
def test_entrypoint_runs_the_package_module(dockerfile: Path, module: str) -> None:
    assert exec_form(final_stage(dockerfile), "ENTRYPOINT") == ["python", "-m", module]


def test_worker_entrypoint_module_and_default_command_exist() -> None:
    assert (REPO / "worker" / "diffusion_worker" / "__main__.py").exists()
    command = exec_form(final_stage(WORKER_DOCKERFILE), "CMD")
    assert command == ["serve"]
    build_parser().parse_args(command)  # `serve` with no flags is a valid worker command line


@pytest.mark.parametrize("dockerfile", [WORKER_DOCKERFILE, OPERATOR_DOCKERFILE])
def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = instruction(final_stage(dockerfile), "USER")
    assert len(users) == 1
    uid = users[0].split(":")[0]
    assert uid.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"
    assert int(uid) != 0
    # The chart pins no UID (OpenShift assigns its own), so the image's USER is what runAsNonRoot checks.
    values = yaml.safe_load((REPO / "helm" / "image-diffusion-operator" / "values.yaml").read_text())
    assert values["operator"]["podSecurityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in values["operator"]["podSecurityContext"]


def test_worker_port_and_model_cache_match_the_worker_settings() -> None:
    stage = final_stage(WORKER_DOCKERFILE)
    assert instruction(stage, "EXPOSE") == [str(WorkerSettings.model_fields["port"].default)]
    assert json.loads(instruction(stage, "VOLUME")[0]) == ["/models"]
    env = " ".join(instruction(stage, "ENV"))
    assert f"{ENV_PREFIX}CACHE_DIR=/models" in env
    assert "cache_dir" in WorkerSettings.model_fields


def test_worker_torch_is_the_constrained_version_and_extras_install_with_constraints() -> None:
    dockerfile = WORKER_DOCKERFILE.read_text()
    constraints = (REPO / "constraints.txt").read_text()
    pinned = re.search(r"^torch==(\S+)$", constraints, re.MULTILINE)
    assert pinned is not None
    assert f"ARG TORCH_VERSION={pinned.group(1)}" in dockerfile
    assert 'pip install -c constraints.txt ".[worker]"' in dockerfile
    assert "ARG TORCH_VARIANT=" in dockerfile  # the CPU build for kind sets TORCH_VARIANT=cpu
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"torch=={pinned.group(1)}" in pyproject["project"]["optional-dependencies"]["worker"]


def test_operator_image_installs_only_the_operator_extra() -> None:
    instructions = "\n".join(
        line for line in OPERATOR_DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert 'pip install -c constraints.txt ".[operator]"' in instructions
    assert "torch" not in instructions
    assert "[worker]" not in instructions


def test_dockerignore_lets_in_what_the_package_build_reads() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "constraints.txt", pyproject["project"]["readme"], "worker", "operator"}
    assert needed <= set(allowed)
