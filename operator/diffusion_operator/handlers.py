# pyproject skips following kopf for mypy, so its decorators look untyped here.
# mypy: disable-error-code="untyped-decorator"
"""kopf handler registrations only: each one is thin and delegates to reconcile_service.

Importing this module registers the handlers in kopf's default registry.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from diffusion_operator import constants as c
from diffusion_operator.config import OperatorConfig, config_from_env
from diffusion_operator.kube import ApiError, KubeApi, load_api_client
from diffusion_operator.reconcile import Outcome, reconcile_service

# Read at import: kopf needs the timer interval when the decorator runs.
RESYNC_SECONDS = config_from_env().resync_seconds
CHILD_FILTER = {c.LABEL_MANAGED_BY: c.OPERATOR_NAME}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping under our prefix, post only our own Events, and open the API client."""
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 600
    settings.networking.request_timeout = 60
    if not isinstance(getattr(memo, "config", None), OperatorConfig):
        memo.config = config_from_env()
    if getattr(memo, "api", None) is None:
        memo.api = KubeApi(load_api_client())
    # One pass at a time per service, whichever trigger (handler, timer, child event) started it.
    memo.locks = collections.defaultdict(threading.Lock)
    memo.locks_guard = threading.Lock()


@kopf.on.cleanup()
def close_client(memo: kopf.Memo, **_: Any) -> None:
    """Release the API client's connections."""
    if getattr(memo, "api", None) is not None:
        memo.api.close()


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo.locks_guard:
        lock: threading.Lock = memo.locks[(namespace, name)]
    return lock


def _pass(memo: kopf.Memo, body: Mapping[str, Any]) -> Outcome:
    metadata = body["metadata"]
    try:
        with _lock(memo, metadata["namespace"], metadata["name"]):
            outcome = reconcile_service(memo.api, body, memo.config.worker_image)
    except ApiError as exc:
        if exc.transient:
            raise kopf.TemporaryError(f"API error, will retry: {exc}", delay=exc.retry_after or 5) from exc
        raise
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    return outcome


@kopf.on.resume(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.create(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL)
def reconcile(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """Converge the children on create, on every spec change, and when the operator starts."""
    outcome = _pass(memo, body)
    patch.status.update(outcome.status_delta)
    if outcome.invalid:
        raise kopf.PermanentError(outcome.invalid)


@kopf.timer(c.GROUP, c.VERSION, c.PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """Safety net for missed watch events: the same pass, which writes nothing when nothing changed."""
    patch.status.update(_pass(memo, body).status_delta)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_FILTER)
@kopf.on.event("", "v1", "services", labels=CHILD_FILTER)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=CHILD_FILTER)
def child_changed(
    type: str | None,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A child changed or vanished: restore it and carry its status into the owner's status within seconds.

    kopf's `patch` belongs to the child here, so the owner's status is patched through the API.
    """
    name = labels.get(c.LABEL_INSTANCE)
    if type is None or not name or not namespace:
        return  # the initial listing: resume already reconciles every service
    try:
        owner = memo.api.get(c.API_VERSION, c.KIND, namespace, name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        outcome = _pass(memo, owner)
        if outcome.status_delta:
            memo.api.patch_status(namespace, name, outcome.status_delta)
    except (ApiError, kopf.TemporaryError) as exc:
        # The resync timer or the next event will try again.
        logger.warning("could not reconcile %s/%s after a child change: %s", namespace, name, exc)
