"""Pure status computation: conditions (Ready, Reconciling, Stalled) from what the children report."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_operator import constants as c
from diffusion_operator.pods import worker_pod_problem
from diffusion_operator.render import endpoint, selector_string
from diffusion_operator.spec import Meta, ServiceSpec


@dataclasses.dataclass(frozen=True)
class Observed:
    """The children as the API server last reported them (None: absent)."""

    deployment: Mapping[str, Any] | None = None
    model_cache: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()  # the worker pods (any revision)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Status of each condition type, with reason and message."""

    ready: tuple[bool, str, str]
    reconciling: tuple[bool, str, str]
    stalled: tuple[bool, str, str]


def now_iso() -> str:
    """Current UTC time in the API's RFC 3339 form, to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for condition in deployment.get("status", {}).get("conditions") or ():
        if condition.get("type") == type_:
            return dict(condition)
    return {}


def _deadline_exceeded(deployment: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Deployment's Progressing condition when its progress deadline has passed, for its
    current generation: a condition left from the generation before (the apply of a fix, a scale
    to 0, answered before the controller saw it) would mark the fix Stalled at once."""
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration", 0)) < int(deployment["metadata"].get("generation", 1)):
        return None
    progressing = _deployment_condition(deployment, "Progressing")
    stalled = progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded"
    return progressing if stalled else None


def _only_current_template(deployment: Mapping[str, Any], desired: int) -> bool:
    """The Deployment has seen its current generation and runs `desired` pods of that template
    and no others."""
    status = deployment.get("status") or {}
    return (
        int(status.get("observedGeneration", 0)) >= int(deployment["metadata"].get("generation", 1))
        and int(status.get("updatedReplicas", 0)) >= desired
        and int(status.get("replicas", 0)) == int(status.get("updatedReplicas", 0))
    )


def _serving(spec: ServiceSpec, deployment: Mapping[str, Any]) -> bool:
    """All `spec.replicas` pods of the Deployment's current generation are available (replicas > 0)."""
    desired = spec.replicas
    return (
        desired > 0
        and _only_current_template(deployment, desired)
        and int((deployment.get("status") or {}).get("availableReplicas", 0)) >= desired
        and _deployment_condition(deployment, "Available").get("status") == "True"
    )


def _rolled_out_before(deployment: Mapping[str, Any], desired: int) -> bool:
    """The Deployment completed the rollout of its current template (Progressing says
    NewReplicaSetAvailable at its current generation) and runs only that template's pods: pods
    missing now were lost after the rollout, and the Deployment's progress deadline, which never
    fires after a completed rollout, will not turn a failure into RolloutStalled."""
    progressing = _deployment_condition(deployment, "Progressing")
    return progressing.get("reason") == "NewReplicaSetAvailable" and _only_current_template(
        deployment, desired
    )


def _rejected_pods(deployment: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the ReplicaSet cannot create pods at all (a ResourceQuota, a Pod
    Security admission, a missing ServiceAccount): there are then no pods to explain it."""
    failure = _deployment_condition(deployment, "ReplicaFailure")
    if failure.get("status") != "True":
        return None
    return c.REASON_WORKER_PODS_REJECTED, f"worker pods cannot be created: {failure.get('message', '')}"


def pods_needed(spec: ServiceSpec, deployment: Mapping[str, Any] | None) -> bool:
    """Whether `judge` reads the worker pods: a rollout under way or stalled, not a service that is
    serving or scaled to zero (so a Ready service's passes list no pods)."""
    if deployment is None:
        return False
    return _deadline_exceeded(deployment) is not None or (
        spec.replicas > 0 and not _serving(spec, deployment)
    )


def judge(spec: ServiceSpec, meta: Meta, observed: Observed, *, was_failing: bool = False) -> Verdict:
    """The three conditions for a valid spec (kstatus: Reconciling until available at this generation).
    `was_failing`: the previous Ready reason was WorkerFailing (see pods.worker_pod_problem)."""
    cache = observed.model_cache
    if cache is not None and cache.get("status", {}).get("phase") == "Lost":
        message = (
            f"PersistentVolumeClaim {cache['metadata']['name']} lost its volume; recreate it or its volume"
        )
        return Verdict(
            ready=(False, c.REASON_MODEL_CACHE_UNBOUND, message),
            reconciling=(False, c.REASON_MODEL_CACHE_UNBOUND, message),
            stalled=(True, c.REASON_MODEL_CACHE_UNBOUND, message),
        )
    deployment = observed.deployment
    if deployment is None:
        message = "creating the worker Deployment"
        return Verdict(
            ready=(False, c.REASON_PROGRESSING, message),
            reconciling=(True, c.REASON_PROGRESSING, message),
            stalled=(False, c.REASON_AS_EXPECTED, ""),
        )
    status = deployment.get("status") or {}
    problem = worker_pod_problem(observed.pods, was_failing=was_failing) or _rejected_pods(deployment)
    progressing = _deadline_exceeded(deployment)
    if progressing is not None:
        message = f"worker rollout stalled: {progressing.get('message', 'progress deadline exceeded')}"
        if problem is not None:
            message += f"; {problem[1]}"
        return Verdict(
            ready=(False, c.REASON_ROLLOUT_STALLED, message),
            reconciling=(False, c.REASON_ROLLOUT_STALLED, message),
            stalled=(True, c.REASON_ROLLOUT_STALLED, message),
        )
    desired = spec.replicas
    observed_current = int(status.get("observedGeneration", 0)) >= int(
        deployment["metadata"].get("generation", 1)
    )
    total = int(status.get("replicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if desired == 0:
        if observed_current and total == 0:
            return Verdict(
                ready=(True, c.REASON_SCALED_TO_ZERO, "replicas is 0: no worker pods run"),
                reconciling=(False, c.REASON_RECONCILED, ""),
                stalled=(False, c.REASON_AS_EXPECTED, ""),
            )
        message = f"scaling down: {total} worker pods left"
    else:
        if _serving(spec, deployment):
            return Verdict(
                ready=(True, c.REASON_AVAILABLE, f"{ready}/{desired} worker pods ready"),
                reconciling=(False, c.REASON_RECONCILED, ""),
                stalled=(False, c.REASON_AS_EXPECTED, ""),
            )
        if _rolled_out_before(deployment, desired):
            return _degraded(desired, available, problem)
        message = f"rolling out: {updated}/{desired} worker pods updated, {available} available"
        if problem is not None:
            reason, detail = problem
            message = f"{message}; {detail}"
            return Verdict(
                ready=(False, reason, message),
                reconciling=(True, reason, message),
                stalled=(False, c.REASON_AS_EXPECTED, ""),
            )
    return Verdict(
        ready=(False, c.REASON_ROLLING_OUT, message),
        reconciling=(True, c.REASON_ROLLING_OUT, message),
        stalled=(False, c.REASON_AS_EXPECTED, ""),
    )


def _degraded(desired: int, available: int, problem: tuple[str, str] | None) -> Verdict:
    """Pods lost after a completed rollout. A worker that fails (crash loop, image pull) is Stalled
    at once: no deadline would ever end a Reconciling=True, and Argo CD and Flux should say Degraded,
    not Progressing. Pods being replaced, waiting for a GPU or for quota are Reconciling: the
    Deployment is working on it, as it is after a node drain."""
    message = f"{available}/{desired} worker pods available after the rollout completed"
    reason = c.REASON_WORKERS_UNAVAILABLE
    if problem is not None:
        reason, detail = problem
        message = f"{message}; {detail}"
    failing = reason == c.REASON_WORKER_FAILING
    return Verdict(
        ready=(False, reason, message),
        reconciling=(not failing, reason, message),
        stalled=(True, reason, message) if failing else (False, c.REASON_AS_EXPECTED, ""),
    )


def invalid_verdict(message: str) -> Verdict:
    """The spec cannot be served until someone changes it."""
    return Verdict(
        ready=(False, c.REASON_INVALID_SPEC, message),
        reconciling=(False, c.REASON_INVALID_SPEC, message),
        stalled=(True, c.REASON_INVALID_SPEC, message),
    )


def api_error_verdict(message: str) -> Verdict:
    """The API server refuses what the operator must read or write (a 403 after an RBAC change, say):
    Stalled, as retrying the same request cannot help until someone changes the cluster; the
    conditions of the last good pass no longer describe what runs, so Ready turns False."""
    return Verdict(
        ready=(False, c.REASON_API_ERROR, message),
        reconciling=(False, c.REASON_API_ERROR, message),
        stalled=(True, c.REASON_API_ERROR, message),
    )


def merge_condition(
    previous: Sequence[Mapping[str, Any]],
    type_: str,
    value: tuple[bool, str, str],
    generation: int,
    now: str,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime is kept unless the status flips."""
    status = "True" if value[0] else "False"
    old = next((cond for cond in previous if cond.get("type") == type_), None)
    transition = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else now
    )
    return {
        "type": type_,
        "status": status,
        "reason": value[1],
        "message": value[2],
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }


def build_status(
    meta: Meta,
    verdict: Verdict,
    previous: Mapping[str, Any],
    *,
    spec: ServiceSpec | None,
    observed: Observed,
    now: str,
) -> dict[str, Any]:
    """The whole status for this pass (spec None: invalid, so no endpoint is advertised anew)."""
    conditions = previous.get("conditions") or []
    result: dict[str, Any] = {
        "observedGeneration": meta.generation,
        "conditions": [
            merge_condition(conditions, c.CONDITION_READY, verdict.ready, meta.generation, now),
            merge_condition(conditions, c.CONDITION_RECONCILING, verdict.reconciling, meta.generation, now),
            merge_condition(conditions, c.CONDITION_STALLED, verdict.stalled, meta.generation, now),
        ],
    }
    deployment_status = (observed.deployment or {}).get("status") or {}
    result["replicas"] = int(deployment_status.get("replicas", 0))
    result["readyReplicas"] = int(deployment_status.get("readyReplicas", 0))
    if spec is not None:
        result["endpoint"] = endpoint(spec, meta)
        result["servedModel"] = spec.served_model
        result["selector"] = selector_string(meta)
    return result


def status_delta(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level status keys whose value changes (empty: nothing to write)."""
    return {key: value for key, value in desired.items() if current.get(key) != value}
