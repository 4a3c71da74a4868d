"""Status: kstatus conditions from observed children; lastTransitionTime moves only on a status flip."""

from __future__ import annotations

from typing import Any

from diffusion_operator import constants as c
from diffusion_operator.spec import Meta, parse_spec
from diffusion_operator.status import (
    Observed,
    build_status,
    invalid_verdict,
    judge,
    merge_condition,
    status_delta,
)

META = Meta(name="svc", namespace="ns", uid="u", generation=2)
SPEC = parse_spec({"model": {"id": "builtin:tiny-sd", "servedName": "tiny"}, "replicas": 2})


def deployment(generation: int = 1, observed: int = 1, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "svc", "generation": generation},
            "status": {"observedGeneration": observed, **status}}  # fmt: skip


AVAILABLE = [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True"}]


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}


def test_first_pass_without_deployment_is_reconciling_not_ready() -> None:
    status = build_status(META, judge(SPEC, META, Observed()), {}, spec=SPEC, observed=Observed(), now="T0")
    assert conditions(status) == {
        "Ready": ("False", c.REASON_PROGRESSING),
        "Reconciling": ("True", c.REASON_PROGRESSING),
        "Stalled": ("False", c.REASON_AS_EXPECTED),
    }
    assert status["observedGeneration"] == 2
    assert status["endpoint"] == "http://svc.ns.svc:8000/v1"
    assert status["servedModel"] == "tiny"
    assert all(cond["observedGeneration"] == 2 for cond in status["conditions"])


def test_available_at_current_generation_is_ready_and_done() -> None:
    dep = deployment(
        replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2, conditions=AVAILABLE
    )
    observed = Observed(deployment=dep)
    status = build_status(META, judge(SPEC, META, observed), {}, spec=SPEC, observed=observed, now="T0")
    assert conditions(status)["Ready"] == ("True", c.REASON_AVAILABLE)
    assert conditions(status)["Reconciling"] == ("False", c.REASON_RECONCILED)
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)


def test_deployment_not_yet_observed_at_its_generation_is_still_reconciling() -> None:
    dep = deployment(generation=3, observed=2, replicas=2, updatedReplicas=2, readyReplicas=2,
                     availableReplicas=2, conditions=AVAILABLE)  # fmt: skip
    verdict = judge(SPEC, META, Observed(deployment=dep))
    assert verdict.reconciling[0] and not verdict.ready[0]


def test_rollout_with_old_pods_left_is_reconciling() -> None:
    dep = deployment(
        replicas=3, updatedReplicas=2, readyReplicas=3, availableReplicas=3, conditions=AVAILABLE
    )
    verdict = judge(SPEC, META, Observed(deployment=dep))
    assert verdict.reconciling == (True, c.REASON_ROLLING_OUT, verdict.reconciling[2])
    assert not verdict.ready[0]


def test_progress_deadline_exceeded_is_stalled() -> None:
    dep = deployment(conditions=[{"type": "Progressing", "status": "False",
                                  "reason": "ProgressDeadlineExceeded",
                                  "message": "ReplicaSet has timed out progressing."}])  # fmt: skip
    verdict = judge(SPEC, META, Observed(deployment=dep))
    assert verdict.stalled[:2] == (True, c.REASON_ROLLOUT_STALLED)
    assert not verdict.reconciling[0]


def test_lost_model_cache_is_stalled_model_cache_unbound() -> None:
    pvc = {"metadata": {"name": "svc-model-cache"}, "status": {"phase": "Lost"}}
    verdict = judge(SPEC, META, Observed(deployment=deployment(), model_cache=pvc))
    assert verdict.stalled[:2] == (True, c.REASON_MODEL_CACHE_UNBOUND)


def test_pending_model_cache_is_not_stalled() -> None:
    pvc = {"metadata": {"name": "svc-model-cache"}, "status": {"phase": "Pending"}}
    assert not judge(SPEC, META, Observed(deployment=deployment(), model_cache=pvc)).stalled[0]


def test_scaled_to_zero_is_ready() -> None:
    spec = parse_spec({"model": {"id": "x"}, "replicas": 0})
    verdict = judge(spec, META, Observed(deployment=deployment(replicas=0)))
    assert verdict.ready[:2] == (True, c.REASON_SCALED_TO_ZERO)


def test_invalid_spec_is_stalled_and_advertises_no_endpoint() -> None:
    status = build_status(META, invalid_verdict("bad pipeline"), {}, spec=None, observed=Observed(), now="T0")
    assert conditions(status)["Stalled"] == ("True", c.REASON_INVALID_SPEC)
    assert conditions(status)["Ready"] == ("False", c.REASON_INVALID_SPEC)
    assert "endpoint" not in status


def test_last_transition_time_changes_only_when_status_flips() -> None:
    first = merge_condition([], "Ready", (False, "RollingOut", "0/1"), 1, "T0")
    same_status = merge_condition([first], "Ready", (False, "RollingOut", "1/2 now"), 2, "T1")
    flipped = merge_condition([same_status], "Ready", (True, "Available", "2/2"), 2, "T2")
    assert first["lastTransitionTime"] == "T0"
    assert same_status["lastTransitionTime"] == "T0" and same_status["message"] == "1/2 now"
    assert flipped["lastTransitionTime"] == "T2"


def test_unchanged_status_gives_an_empty_delta() -> None:
    observed = Observed(deployment=deployment(replicas=2, updatedReplicas=2, readyReplicas=2,
                                              availableReplicas=2,
                                              conditions=AVAILABLE))  # fmt: skip
    first = build_status(META, judge(SPEC, META, observed), {}, spec=SPEC, observed=observed, now="T0")
    again = build_status(META, judge(SPEC, META, observed), first, spec=SPEC, observed=observed, now="T9")
    assert status_delta(first, again) == {}
    assert status_delta({}, first) == first
