"""The Argo CD health check (Lua) shipped in the chart docs, run on Lua 5.1 like Argo CD's gopher-lua."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

REPO = Path(__file__).resolve().parents[3]
HEALTH_LUA = REPO / "helm" / "image-diffusion-operator" / "docs" / "argocd-health.lua"
ARGOCD_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
# Argo CD runs health scripts with only the base, table, string and math libraries.
UNAVAILABLE_IN_ARGOCD = (
    "os",
    "io",
    "require",
    "dofile",
    "loadfile",
    "load",
    "loadstring",
    "debug",
    "package",
)


def run_health_check(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate the health script with `obj` bound as Argo CD binds it; returns {status, message}."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True, register_eval=False, register_builtins=False)
    lua_globals = lua.globals()
    for name in UNAVAILABLE_IN_ARGOCD:
        lua_globals[name] = None
    lua_globals.obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


def service(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "imagediffusion.dev/v1alpha1",
        "kind": "ImageDiffusionService",
        "metadata": {"name": "sdxl", "namespace": "gpu", "generation": generation},
        "spec": {"model": {"id": "stabilityai/stable-diffusion-xl-base-1.0"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def condition(kind: str, status: str, reason: str, message: str = "", generation: int = 1) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": generation,
    }


def ready_status(generation: int = 1) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "replicas": 2,
        "readyReplicas": 2,
        "endpoint": "http://sdxl.gpu.svc:8000/v1",
        "servedModel": "sdxl",
        "conditions": [
            condition("Ready", "True", "DeploymentAvailable", "2/2 workers ready", generation),
            condition("Reconciling", "False", "UpToDate", "", generation),
            condition("Stalled", "False", "UpToDate", "", generation),
        ],
    }


def test_no_status_yet_is_progressing() -> None:
    health = run_health_check(service())
    assert health["status"] == "Progressing"
    assert "operator" in health["message"]


def test_empty_conditions_are_progressing() -> None:
    assert run_health_check(service(status={"conditions": []}))["status"] == "Progressing"


def test_first_pass_reconciling_is_progressing_with_its_reason() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Ready", "False", "DeploymentUnavailable", "0/1 workers ready"),
            condition("Reconciling", "True", "LoadingModel", "waiting for 1 worker to load the model"),
        ],
    }
    health = run_health_check(service(status=status))
    assert health == {
        "status": "Progressing",
        "message": "LoadingModel: waiting for 1 worker to load the model",
    }


def test_observed_generation_behind_is_progressing_even_when_ready() -> None:
    health = run_health_check(service(generation=3, status=ready_status(generation=2)))
    assert health["status"] == "Progressing"
    assert "generation 3" in health["message"]


def test_missing_observed_generation_is_progressing() -> None:
    status = ready_status()
    del status["observedGeneration"]
    assert run_health_check(service(status=status))["status"] == "Progressing"


def test_ready_condition_of_an_older_generation_is_progressing() -> None:
    status = ready_status(generation=2)
    status["conditions"][0]["observedGeneration"] = 1
    assert run_health_check(service(generation=2, status=status))["status"] == "Progressing"


def test_ready_true_is_healthy_with_replicas_and_endpoint() -> None:
    health = run_health_check(service(status=ready_status()))
    assert health == {
        "status": "Healthy",
        "message": "2/2 replicas ready, serving http://sdxl.gpu.svc:8000/v1",
    }


def test_ready_without_replica_counts_falls_back_to_the_condition() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [condition("Ready", "True", "DeploymentAvailable", "ok")],
    }
    assert run_health_check(service(status=status)) == {
        "status": "Healthy",
        "message": "DeploymentAvailable: ok",
    }


def test_stalled_true_is_degraded_with_reason_and_message() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Ready", "False", "InvalidSpec", "unknown pipeline"),
            condition("Reconciling", "False", "InvalidSpec"),
            condition(
                "Stalled", "True", "InvalidSpec", "model.pipeline 'NoSuchPipeline' is not a diffusers class"
            ),
        ],
    }
    health = run_health_check(service(status=status))
    assert health == {
        "status": "Degraded",
        "message": "InvalidSpec: model.pipeline 'NoSuchPipeline' is not a diffusers class",
    }


def test_stalled_wins_over_ready() -> None:
    status = ready_status()
    status["conditions"][2] = condition(
        "Stalled", "True", "ModelCacheUnbound", "PVC sdxl-models is not bound"
    )
    assert run_health_check(service(status=status))["status"] == "Degraded"


def test_ready_while_still_reconciling_a_rollout_is_progressing() -> None:
    status = ready_status(generation=2)
    status["conditions"][1] = condition("Reconciling", "True", "RollingOut", "1/2 workers updated", 2)
    health = run_health_check(service(generation=2, status=status))
    assert health == {"status": "Progressing", "message": "RollingOut: 1/2 workers updated"}


def test_not_ready_and_not_reconciling_is_degraded() -> None:
    status = ready_status()
    status["conditions"][0] = condition("Ready", "False", "DeploymentUnavailable", "0/2 workers ready")
    health = run_health_check(service(status=status))
    assert health == {"status": "Degraded", "message": "DeploymentUnavailable: 0/2 workers ready"}


def test_ready_unknown_is_progressing() -> None:
    status = {"observedGeneration": 1, "conditions": [condition("Ready", "Unknown", "Pending")]}
    assert run_health_check(service(status=status))["status"] == "Progressing"


@pytest.mark.parametrize(
    "status",
    [
        None,
        {},
        {"conditions": []},
        {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]},
        {"observedGeneration": 1, "conditions": [{"type": "Stalled", "status": "True"}]},
        {"observedGeneration": 1, "conditions": [{"type": "Reconciling", "status": "True"}]},
        {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "False"}]},
        {"observedGeneration": 1, "conditions": [{"type": "SomethingElse", "status": "True"}]},
    ],
)
def test_sparse_statuses_give_a_valid_argocd_status_and_a_string_message(
    status: dict[str, Any] | None,
) -> None:
    health = run_health_check(service(status=status))
    assert health["status"] in ARGOCD_STATUSES
    assert isinstance(health["message"], str)
    assert health["message"]


def test_chart_readme_embeds_the_same_script_in_a_valid_argocd_cm() -> None:
    readme = (HEALTH_LUA.parent.parent / "README.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in readme.split("```yaml")[1:]]
    configmaps = [yaml.safe_load(block.split("```", 1)[0]) for block in blocks if "kind: ConfigMap" in block]
    assert len(configmaps) == 1, "the chart README must show one argocd-cm example"
    script = configmaps[0]["data"]["resource.customizations.health.imagediffusion.dev_ImageDiffusionService"]
    assert script == HEALTH_LUA.read_text()
