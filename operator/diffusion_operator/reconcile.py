"""One reconcile pass: render the children, apply those that differ, observe them, compute the status."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.utils import parse_quantity

from diffusion_operator import constants as c
from diffusion_operator.kube import ApiError, KubeApi
from diffusion_operator.render import Manifest, model_cache_name, render_children, selector_string
from diffusion_operator.spec import InvalidSpecError, Meta, parse_spec
from diffusion_operator.status import (
    Observed,
    Verdict,
    api_error_verdict,
    build_status,
    invalid_verdict,
    judge,
    now_iso,
    pods_needed,
    status_delta,
)

logger = logging.getLogger(__name__)

# Ready reasons that say why worker pods do not run: a Warning Event when one starts.
WORKER_PROBLEMS = frozenset(
    {c.REASON_WORKER_FAILING, c.REASON_WORKER_UNSCHEDULABLE, c.REASON_WORKER_PODS_REJECTED}
)


@dataclasses.dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the ImageDiffusionService."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a pass decided: the status keys to write, events to post, and whether the spec is unusable."""

    status_delta: dict[str, Any]
    events: list[Event]
    invalid: str | None = None


def meta_from_body(body: Mapping[str, Any]) -> Meta:
    """The identity of an ImageDiffusionService from its body."""
    metadata = body["metadata"]
    return Meta(
        name=metadata["name"],
        namespace=metadata["namespace"],
        uid=metadata["uid"],
        generation=int(metadata.get("generation") or 1),
    )


# Maps whose values are resource quantities, which the API server stores in canonical form
# (`1000m` -> `1`, `1.5Gi` -> `1536Mi`): a container's and a PVC's `requests` and `limits`.
QUANTITY_MAPS = frozenset({"requests", "limits"})


def _same_quantity(want: Any, have: Any) -> bool:
    try:
        return bool(parse_quantity(want) == parse_quantity(have))
    except (TypeError, ValueError):
        return False


# Keys by which server-side apply merges lists of objects (containers, env, volumes, volumeMounts,
# ports, ownerReferences): items another field manager added stay (`kubectl set env`, a policy
# engine), so such a list is matched item by item, not by position and length.
LIST_MERGE_KEYS = ("name", "mountPath", "containerPort", "uid")


def _merge_key(items: list[Any]) -> str | None:
    """The merge key every item of `items` carries, if they are objects that have one."""
    for key in LIST_MERGE_KEYS:
        if items and all(isinstance(item, Mapping) and key in item for item in items):
            return key
    return None


def _unset(value: Any) -> bool:
    """Values the server does not store (omitempty): wanting one matches its absence."""
    return value is None or value == "" or value == [] or value == {}


def is_subset(want: Any, have: Any, *, quantities: bool = False) -> bool:
    """Whether every field of `want` is present and equal in `have` (the server may add defaults;
    values of QUANTITY_MAPS compare by amount, or every pass would re-apply a spec written `1000m`).
    Lists with a merge key match by key, in any order, with extra items allowed; other lists are
    atomic and must match whole, in order."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            is_subset(v, have[k], quantities=quantities or k in QUANTITY_MAPS) if k in have else _unset(v)
            for k, v in want.items()
        )
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        key = _merge_key(want)
        if key is not None:
            by_key = {item.get(key): item for item in have if isinstance(item, Mapping)}
            return all(w[key] in by_key and is_subset(w, by_key[w[key]]) for w in want)
        return len(want) == len(have) and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
    return bool(want == have) or (quantities and _same_quantity(want, have))


def needs_apply(desired: Manifest, live: Mapping[str, Any] | None) -> bool:
    """Apply when the child is missing, was rendered differently, or was edited by hand.

    The hash catches fields we stopped setting (SSA then removes them); the subset check catches drift.
    """
    if live is None:
        return True
    live_hash = (live.get("metadata", {}).get("annotations") or {}).get(c.ANNOTATION_APPLIED_HASH)
    if live_hash != desired["metadata"]["annotations"][c.ANNOTATION_APPLIED_HASH]:
        return True
    return not is_subset(desired, live)


def _previous_conditions(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {cond.get("type", ""): cond for cond in (body.get("status") or {}).get("conditions") or ()}


def _stalled_with(body: Mapping[str, Any], reason: str, message: str) -> bool:
    stalled = _previous_conditions(body).get(c.CONDITION_STALLED) or {}
    return (
        stalled.get("status") == "True"
        and stalled.get("reason") == reason
        and stalled.get("message") == message
    )


def _worker_pods(api: KubeApi, meta: Meta, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The worker pods, for the Ready message. They only explain, so failing to list them does not
    fail the pass (under API faults that would cost a retry of everything; without the `pods` RBAC
    grant, every pass), except a transient failure while the status names a pod problem, which a
    pass without pods would wrongly clear: that pass is retried."""
    try:
        return api.list("v1", "Pod", meta.namespace, selector_string(meta))
    except ApiError as exc:
        reason = (_previous_conditions(body).get(c.CONDITION_READY) or {}).get("reason")
        if exc.transient and reason in WORKER_PROBLEMS:
            raise
        level = logging.INFO if exc.transient else logging.WARNING
        logger.log(level, "worker pods of %s/%s not listed: %s", meta.namespace, meta.name, exc)
        return []


def _observe(api: KubeApi, meta: Meta) -> Observed:
    """The children, for the status of a pass that decided its verdict without them (no pods)."""
    return Observed(
        deployment=api.get("apps/v1", "Deployment", meta.namespace, meta.name),
        model_cache=api.get("v1", "PersistentVolumeClaim", meta.namespace, model_cache_name(meta.name)),
    )


@dataclasses.dataclass
class Applied:
    """What apply_children did: each child as the server now has it (absent: never created), the
    Events to post, why each child it could not apply was not (the server refused it, or an object
    that is not the service's has its name), and the children it waits to apply until an object of
    their name that is on its way out is gone."""

    lives: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    events: list[Event] = dataclasses.field(default_factory=list)
    rejected: list[str] = dataclasses.field(default_factory=list)
    waiting: list[str] = dataclasses.field(default_factory=list)


def _changed(live: Mapping[str, Any] | None, applied: Mapping[str, Any]) -> bool:
    """Whether an apply created or changed the child: a no-op apply keeps its resourceVersion
    (one that needs_apply could not tell from a change, e.g. a field the server does not keep,
    must not post an Event on every pass)."""
    if live is None:
        return True
    version = (live.get("metadata") or {}).get("resourceVersion")
    return version is None or version != (applied.get("metadata") or {}).get("resourceVersion")


def foreign_owner(live: Mapping[str, Any], meta: Meta) -> str | None:
    """Why `live`, an object that has a child's name, is not this service's to change; None when it
    is: an owner reference names this service, or it has no controller and carries this service's
    labels (a model cache kept by `retainOnDelete`). Applying over anything else would take it
    over: a Service repointed at the workers, a user's PVC mounted by them and, once owned,
    garbage-collected with the service, its data with it."""
    metadata = live.get("metadata") or {}
    owners = metadata.get("ownerReferences") or []
    if any(owner.get("uid") == meta.uid for owner in owners):
        return None
    controller = next((owner for owner in owners if owner.get("controller")), None)
    if controller is not None:
        # An earlier service of this name gets here too (see leaving): not ours to change either.
        kind, name, uid = controller.get("kind"), controller.get("name"), controller.get("uid")
        return f"it is controlled by {kind} {name} (uid {uid})"
    labels = metadata.get("labels") or {}
    if labels.get(c.LABEL_MANAGED_BY) == c.OPERATOR_NAME and labels.get(c.LABEL_INSTANCE) == meta.name:
        return None
    return "it was not created for this service"


def leaving(live: Mapping[str, Any], meta: Meta) -> str | None:
    """Why `live`, an object of a child's name that is not this service's, will be gone without
    anyone's help; None when it stays. It is being deleted (a deletionTimestamp: a PVC that the
    pvc-protection finalizer keeps while the pods of a deleted service terminate), or its
    controller is an earlier ImageDiffusionService of this name, which no longer exists (this one
    has the name), so the garbage collector deletes it or, after an orphaning delete, takes its
    owner reference off."""
    metadata = live.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        finalizers = metadata.get("finalizers") or []
        if not finalizers:
            return "deletion under way"
        return f"held by the finalizer{'s' if len(finalizers) > 1 else ''} {', '.join(finalizers)}"
    for owner in metadata.get("ownerReferences") or ():
        if (
            owner.get("controller")
            and (owner.get("apiVersion") or "").split("/")[0] == c.GROUP
            and (owner.get("kind"), owner.get("name")) == (c.KIND, meta.name)
            and owner.get("uid") != meta.uid
        ):
            return f"owned by the deleted {c.KIND} {meta.name}, uid {owner.get('uid')}"
    return None


def apply_children(api: KubeApi, children: list[Manifest], meta: Meta) -> Applied:
    """Apply the children that need it, each on its own: a child the server rejects (a PVC shrink,
    say) does not hold back the others (an image or replicas change in the same commit).

    An object of a child's name that is not this service's (foreign_owner) is left as it is:
    waited for when it is on its way out (leaving: an earlier service of this name, deleted moments
    ago), else reported. When it is the model cache, the Deployment, whose pods would mount it, is
    held back too. A transient API error propagates (the caller retries the pass).
    """
    result = Applied()
    cache_blocked: list[str] | None = None  # where the model cache's problem went, rejected or waiting
    for child in children:
        kind, name = child["kind"], child["metadata"]["name"]
        live = api.get(child["apiVersion"], kind, meta.namespace, name)
        why = foreign_owner(live, meta) if live is not None else None
        if live is not None and why is not None:
            gone_soon = leaving(live, meta)
            blocked = result.waiting if gone_soon else result.rejected
            if kind == "PersistentVolumeClaim":
                cache_blocked = blocked
            blocked.append(
                f"waiting for the previous {kind} {name} to be deleted ({gone_soon})"
                if gone_soon
                else f"{kind} {name} already exists and is not this service's ({why}); "
                f"delete or rename it, or give the service another name"
            )
            continue
        if kind == "Deployment" and cache_blocked is not None:
            cache_blocked.append(
                f"Deployment {name} not applied: its pods would mount that PersistentVolumeClaim"
            )
            continue
        if needs_apply(child, live):
            try:
                applied = api.apply(child)
            except ApiError as exc:
                if exc.transient:
                    raise
                result.rejected.append(f"the API server rejected {kind} {name}: {exc.message}")
            else:
                if _changed(live, applied):
                    verb = "Created" if live is None else "Updated"
                    reason = c.REASON_CREATED if live is None else c.REASON_UPDATED
                    logger.info("%s %s %s/%s", verb, kind, meta.namespace, name)
                    result.events.append(Event("Normal", reason, f"{verb} {kind} {name}"))
                live = applied
        if live is not None:
            result.lives[kind] = live
    return result


def first_pass_failed(body: Mapping[str, Any], exc: ApiError) -> dict[str, Any] | None:
    """The status for a service that has none yet, when its pass failed on an API error that will be
    retried (a fail-closed admission webhook that is down answers 500 to every apply of a child):
    Reconciling, with the error, instead of no conditions at all while the retries go on. None for
    a service that already has conditions: they stay true until a pass finishes."""
    if _previous_conditions(body):
        return None
    message = f"could not create the children yet, retrying: {exc}"
    verdict = Verdict(
        ready=(False, c.REASON_PROGRESSING, message),
        reconciling=(True, c.REASON_PROGRESSING, message),
        stalled=(False, c.REASON_AS_EXPECTED, ""),
    )
    return build_status(meta_from_body(body), verdict, {}, spec=None, observed=Observed(), now=now_iso())


def api_error_message(exc: ApiError) -> str:
    """What the API server refused, and what to do about a refusal that is the operator's RBAC."""
    message = f"the API server refused {exc.request or 'a request'}: HTTP {exc.status}: {exc.message}"
    if exc.status == 403:
        message += "; grant it to the operator's ServiceAccount (the chart's ClusterRole lists what it needs)"
    return message + "; every pass tries again"


def api_error_status(body: Mapping[str, Any], message: str) -> dict[str, Any]:
    """Conditions saying the API server refuses the operator (Stalled, ApiError). Only the
    conditions and observedGeneration: replicas, endpoint and the rest keep their last known values
    (status.replicas feeds the scale subresource, which an autoscaler reads)."""
    meta = meta_from_body(body)
    previous = body.get("status") or {}
    verdict = api_error_verdict(message)
    status = build_status(meta, verdict, previous, spec=None, observed=Observed(), now=now_iso())
    return {key: status[key] for key in ("observedGeneration", "conditions")}


def reconcile_service(api: KubeApi, body: Mapping[str, Any], default_image: str) -> Outcome:
    """Bring the children of one ImageDiffusionService to its spec and say what its status should be.

    A transient API error propagates (the caller retries the pass). Any other error left (a child
    the API server will not let the operator read: 403 after an RBAC change) makes the status say
    so, Stalled/ApiError, instead of leaving an earlier Ready=True in place.
    """
    try:
        return _reconcile(api, body, default_image)
    except ApiError as exc:
        if exc.transient:
            raise
        message = api_error_message(exc)
        logger.warning("%s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"], message)
        delta = status_delta(body.get("status") or {}, api_error_status(body, message))
        repeated = _stalled_with(body, c.REASON_API_ERROR, message)
        return Outcome(delta, [] if repeated else [Event("Warning", c.REASON_API_ERROR, message)])


def _reconcile(api: KubeApi, body: Mapping[str, Any], default_image: str) -> Outcome:
    meta = meta_from_body(body)
    previous = body.get("status") or {}
    now = now_iso()
    try:
        spec = parse_spec(body.get("spec") or {})
    except InvalidSpecError as exc:
        message = str(exc)
        # Existing children keep serving the last good spec; a new service gets none.
        observed = _observe(api, meta)
        status = build_status(meta, invalid_verdict(message), previous, spec=None, observed=observed, now=now)
        events = (
            []
            if _stalled_with(body, c.REASON_INVALID_SPEC, message)
            else [Event("Warning", c.REASON_INVALID_SPEC, message)]
        )
        return Outcome(status_delta(previous, status), events, invalid=message)

    applied = apply_children(api, render_children(spec, meta, default_image), meta)
    lives, events = applied.lives, applied.events
    if applied.rejected or applied.waiting:
        if applied.rejected:
            # The server rejected a child (e.g. a PVC shrink), or its name is taken: neither fixes itself.
            message = "; ".join(applied.rejected + applied.waiting)
            verdict = Verdict(
                ready=(False, c.REASON_APPLY_FAILED, message),
                reconciling=(False, c.REASON_APPLY_FAILED, message),
                stalled=(True, c.REASON_APPLY_FAILED, message),
            )
            if not _stalled_with(body, c.REASON_APPLY_FAILED, message):
                events.append(Event("Warning", c.REASON_APPLY_FAILED, message))
        else:
            # An earlier service's child on its way out (a delete and re-create under the same
            # name): it goes by itself, and the pass its removal triggers applies ours. No Warning.
            message = "; ".join(applied.waiting)
            verdict = Verdict(
                ready=(False, c.REASON_WAITING_FOR_DELETION, message),
                reconciling=(True, c.REASON_WAITING_FOR_DELETION, message),
                stalled=(False, c.REASON_AS_EXPECTED, ""),
            )
        seen = Observed(deployment=lives.get("Deployment"), model_cache=lives.get("PersistentVolumeClaim"))
        status = build_status(meta, verdict, previous, spec=spec, observed=seen, now=now)
        return Outcome(status_delta(previous, status), events)

    deployment = lives.get("Deployment")
    observed = Observed(
        deployment=deployment,
        model_cache=lives.get("PersistentVolumeClaim"),
        pods=_worker_pods(api, meta, body) if pods_needed(spec, deployment) else (),
    )
    previous_ready = _previous_conditions(body).get(c.CONDITION_READY) or {}
    was_failing = previous_ready.get("reason") == c.REASON_WORKER_FAILING
    verdict = judge(spec, meta, observed, was_failing=was_failing)
    status = build_status(meta, verdict, previous, spec=spec, observed=observed, now=now)
    ready, reason, message = verdict.ready
    if ready and previous_ready.get("status") != "True":
        events.append(Event("Normal", reason, f"ready at {status['endpoint']}: {message}"))
    if reason in WORKER_PROBLEMS and previous_ready.get("reason") != reason:
        events.append(Event("Warning", reason, message))  # once per problem, not per restart or retry
    return Outcome(status_delta(previous, status), events)
