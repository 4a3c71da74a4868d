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


def test_a_deadline_left_from_the_generation_before_does_not_stall_the_fix() -> None:
    """The apply of a fix (or a scale to 0) is answered before the controller has seen it: the old
    generation's ProgressDeadlineExceeded is still there, and Flux or a kstatus wait would have
    read the new generation as Failed at once."""
    exceeded = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet has timed out progressing."}]  # fmt: skip
    fix_applied = deployment(generation=6, observed=5, conditions=exceeded)
    verdict = judge(SPEC, META, Observed(deployment=fix_applied))
    assert verdict.stalled[0] is False and verdict.reconciling[:2] == (True, c.REASON_ROLLING_OUT)
    seen = deployment(generation=6, observed=6, conditions=exceeded)
    assert judge(SPEC, META, Observed(deployment=seen)).stalled[:2] == (True, c.REASON_ROLLOUT_STALLED)


COMPLETE = [
    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
]
CRASHING_POD = {
    "metadata": {"name": "svc-abc-1"},
    "status": {"containerStatuses": [{"name": c.WORKER_CONTAINER_NAME, "restartCount": 7,
                                      "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
}  # fmt: skip


def test_a_worker_crashing_after_a_completed_rollout_is_stalled_not_reconciling() -> None:
    """The Deployment's progress deadline never fires once a rollout completed, so Reconciling=True
    would last for ever and Argo CD / Flux would show Progressing instead of Degraded."""
    dep = deployment(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1, conditions=COMPLETE)
    verdict = judge(SPEC, META, Observed(deployment=dep, pods=[CRASHING_POD]))
    assert verdict.stalled[:2] == (True, c.REASON_WORKER_FAILING)
    assert verdict.reconciling[0] is False and verdict.ready[:2] == (False, c.REASON_WORKER_FAILING)
    assert verdict.ready[2].startswith("1/2 worker pods available after the rollout completed; ")
    assert "CrashLoopBackOff, restarted 7 times" in verdict.ready[2]


def test_one_restart_after_a_completed_rollout_is_reconciling_not_stalled() -> None:
    """A single liveness kill or OOM: the container runs again, reloading the model, and will most
    likely be ready again; Stalled=True would make Flux stop waiting and Argo CD say Degraded."""
    reloading = {
        "metadata": {"name": "svc-abc-1"},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": c.WORKER_CONTAINER_NAME, "restartCount": 1, "ready": False, "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}}}]},
    }  # fmt: skip
    dep = deployment(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1, conditions=COMPLETE)
    verdict = judge(SPEC, META, Observed(deployment=dep, pods=[reloading]))
    assert verdict.ready[:2] == (False, c.REASON_WORKERS_UNAVAILABLE)
    assert verdict.reconciling[0] is True
    assert verdict.stalled == (False, c.REASON_AS_EXPECTED, "")


def test_an_image_pull_failing_after_a_completed_rollout_stays_stalled_across_retries() -> None:
    """The kubelet alternates ErrImagePull (each retry) and ImagePullBackOff (the wait before the
    next): with the previous Ready reason passed in, the conditions stay put (lastTransitionTime
    included), instead of flipping at every retry."""
    dep = deployment(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1, conditions=COMPLETE)
    status: dict[str, Any] = {}
    seen = []
    for step, reason in enumerate(["ErrImagePull", "ImagePullBackOff"] * 3):
        pulling = {
            "metadata": {"name": "svc-abc-1"},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": c.WORKER_CONTAINER_NAME, "restartCount": 0, "ready": False,
                "state": {"waiting": {"reason": reason, "message": "rpc error: 403 Forbidden"}}}]},
        }  # fmt: skip
        ready = next((cond for cond in status.get("conditions", []) if cond["type"] == "Ready"), {})
        was_failing = ready.get("reason") == c.REASON_WORKER_FAILING
        verdict = judge(SPEC, META, Observed(deployment=dep, pods=[pulling]), was_failing=was_failing)
        status = build_status(
            META, verdict, status, spec=SPEC, observed=Observed(deployment=dep), now=f"t{step}"
        )
        stalled = next(cond for cond in status["conditions"] if cond["type"] == "Stalled")
        seen.append((reason, verdict.ready[1], stalled["status"], stalled["lastTransitionTime"]))
    assert seen[0] == ("ErrImagePull", c.REASON_WORKERS_UNAVAILABLE, "False", "t0"), "a first failed pull"
    assert all(
        (ready_reason, stalled, since) == (c.REASON_WORKER_FAILING, "True", "t1")
        for _, ready_reason, stalled, since in seen[1:]
    ), seen


def test_pods_lost_after_a_completed_rollout_without_a_failure_are_reconciling() -> None:
    """A pod replaced after a node drain, or unready while it loads the model again."""
    dep = deployment(replicas=2, updatedReplicas=2, readyReplicas=1, availableReplicas=1, conditions=COMPLETE)
    verdict = judge(SPEC, META, Observed(deployment=dep))
    assert verdict.reconciling[:2] == (True, c.REASON_WORKERS_UNAVAILABLE)
    assert verdict.stalled[0] is False and verdict.ready[0] is False


def test_a_crash_during_a_rollout_stays_reconciling_until_the_deadline() -> None:
    rolling = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
    dep = deployment(replicas=2, updatedReplicas=2, readyReplicas=0, availableReplicas=0, conditions=rolling)
    verdict = judge(SPEC, META, Observed(deployment=dep, pods=[CRASHING_POD]))
    assert verdict.reconciling[:2] == (True, c.REASON_WORKER_FAILING)
    assert verdict.stalled[0] is False


def test_pods_the_replica_set_cannot_create_are_named_in_ready() -> None:
    """Quota or Pod Security admission: no pods exist to explain it; the Deployment's
    ReplicaFailure condition does."""
    quota = 'pods "svc-abc-x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'
    failure = {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": quota}
    rolling = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}, failure]
    dep = deployment(replicas=0, updatedReplicas=0, availableReplicas=0, conditions=rolling)
    verdict = judge(SPEC, META, Observed(deployment=dep))
    assert verdict.ready[:2] == (False, c.REASON_WORKER_PODS_REJECTED)
    assert verdict.ready[2].endswith("worker pods cannot be created: " + failure["message"])
    assert verdict.reconciling[0] is True and verdict.stalled[0] is False


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
