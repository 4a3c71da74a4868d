# pyproject skips following kopf for mypy, so its decorators look untyped here.
# mypy: disable-error-code="untyped-decorator"
"""kopf handler registrations only: each one is thin and delegates to reconcile_service.

`build_registry()` registers the handlers in a fresh kopf registry, so each run (or test) gets its
own handlers; the operator's configuration travels in kopf's memo (`memo.config`).

No handler needs a finalizer, so kopf puts none on the services (and removes the one an older
operator left): a service whose operator is gone, as in `helm uninstall` of a release that holds
both (Helm deletes the operator's Deployment and RBAC before custom resources), is still deleted
and its children garbage-collected. The periodic resync is therefore not a kopf timer (timers
require a finalizer) but one loop started with the operator, walking an index of the services.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf

from diffusion_operator import constants as c
from diffusion_operator.kube import ApiError, KubeApi, load_api_client
from diffusion_operator.reconcile import (
    Event,
    Outcome,
    api_error_message,
    api_error_status,
    first_pass_failed,
    reconcile_service,
)

LOGGER = logging.getLogger(__name__)
EventPoster = Callable[[kopf.Memo, Mapping[str, Any], Event], None]
CHILD_FILTER = {c.LABEL_MANAGED_BY: c.OPERATOR_NAME}
# Watched for the services' sake: the children, and the worker pods (not children, but their state
# is the service's; see pods.py). Label-selected on the server, so the operator never streams the
# rest of the cluster's Deployments, Services, PVCs and Pods.
WATCHED = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("", "v1", "persistentvolumeclaims"),
    ("", "v1", "pods"),
)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's bookkeeping under our prefix, post only our own Events, and open the API client."""
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = c.OPERATOR_NAME  # `kubectl describe`'s "From", as resync's
    settings.watching.server_timeout = 600
    for group, version, plural in WATCHED:
        settings.watching.label_selectors[group, version, plural] = f"{c.LABEL_MANAGED_BY}={c.OPERATOR_NAME}"
    settings.networking.request_timeout = 60
    if getattr(memo, "api", None) is None:
        memo.api = KubeApi(load_api_client())
    # One pass at a time per service, whichever trigger (handler, resync, child event) started it.
    memo.locks = collections.defaultdict(threading.Lock)
    memo.locks_guard = threading.Lock()
    # The status write the API server last refused, by service: told in a Warning once, not per pass.
    memo.status_refusals = {}


def services(namespace: str, name: str, **_: Any) -> dict[tuple[str, str], None]:
    """kopf index of the services this operator watches, by (namespace, name), for the resync."""
    return {(namespace, name): None}


async def start_resync(memo: kopf.Memo, services: kopf.Index[tuple[str, str], None], **_: Any) -> None:
    """Start the resync loop; kopf hands startup handlers the (still filling) services index."""
    memo.resync_task = asyncio.create_task(_resync_forever(memo, services, memo.config.resync_seconds))


async def _resync_forever(
    memo: kopf.Memo, services: kopf.Index[tuple[str, str], None], interval: float
) -> None:
    """Every `interval` seconds, one pass per indexed service (one at a time: gentle on the API
    server). A failing pass is logged and the loop goes on; the next round retries it."""
    while True:
        await asyncio.sleep(interval)
        for namespace, name in list(services):
            try:
                await asyncio.to_thread(_converge, memo, namespace, name, post_through_own_client)
            except (ApiError, kopf.TemporaryError) as exc:
                LOGGER.warning("resync of %s/%s failed, next round retries: %s", namespace, name, exc)
            except Exception:  # the loop must outlive any one service's bug
                LOGGER.exception("resync of %s/%s failed, next round retries", namespace, name)


async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Stop the resync loop and release the API client's connections."""
    task: asyncio.Task[None] | None = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if getattr(memo, "api", None) is not None:
        memo.api.close()


def _lock(memo: kopf.Memo, namespace: str, name: str) -> threading.Lock:
    with memo.locks_guard:
        lock: threading.Lock = memo.locks[(namespace, name)]
    return lock


@contextlib.contextmanager
def _transient_errors_retried() -> Iterator[None]:
    """A transient API error becomes kopf.TemporaryError: kopf retries after Retry-After or 5 s."""
    try:
        yield
    except ApiError as exc:
        if exc.transient:
            raise kopf.TemporaryError(f"API error, will retry: {exc}", delay=exc.retry_after or 5) from exc
        raise


def post_through_kopf(memo: kopf.Memo, body: Mapping[str, Any], event: Event) -> None:
    """Post through kopf's queue (retried with backoff): only inside a kopf handler, where kopf has
    set up its poster for the object being handled."""
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def post_through_own_client(memo: kopf.Memo, body: Mapping[str, Any], event: Event) -> None:
    """Post with the operator's own client, once: for the resync loop, which runs outside every kopf
    handler, so kopf.event has no poster there. A lost Event is logged; the status holds the truth."""
    try:
        memo.api.post_event(body, event.type, event.reason, event.message)
    except ApiError as exc:
        LOGGER.warning("could not post the %s event of %s: %s", event.reason, body["metadata"]["name"], exc)


def _write_status(api: KubeApi, owner: Mapping[str, Any], delta: Mapping[str, Any]) -> ApiError | None:
    """Write a pass's status; a transient error propagates. A refusal retrying cannot fix (403 after
    an RBAC change, 422) is returned, after one try to write conditions that say so instead: a
    smaller patch may pass where the pass's own did not, and otherwise the caller's Event is all
    that tells the user why the status no longer changes."""
    if not delta:
        return None
    metadata = owner["metadata"]
    try:
        api.patch_status(metadata["namespace"], metadata["name"], delta)
    except ApiError as exc:
        if exc.transient:
            raise
        with contextlib.suppress(ApiError):
            api.patch_status(
                metadata["namespace"], metadata["name"], api_error_status(owner, api_error_message(exc))
            )
        return exc
    return None


def _converge(memo: kopf.Memo, namespace: str, name: str, post: EventPoster) -> Outcome | None:
    """One pass over a service: read it, reconcile, write its status, then post the pass's Events.

    Every trigger (a kopf handler, a child's event, the resync) goes through here, and the read,
    the pass and the status write happen under the service's lock: a pass that waited for the
    lock reads the status the previous one wrote, so a transition (Ready, say) is judged, and its
    Event posted, once. None when the service is gone or being deleted. A failed API call raises
    TemporaryError, with no Event posted: the retry judges the same transition again (a service
    with no status yet first gets a Reconciling one that quotes the error). A status write the API
    server refuses for good raises that error (kopf retries), after a Warning ApiError Event the
    first time it is refused so (no condition can say it: every pass, resync and retry would post
    one again).
    """
    with _lock(memo, namespace, name), _transient_errors_retried():
        owner = memo.api.get(c.API_VERSION, c.KIND, namespace, name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return None
        try:
            outcome = reconcile_service(memo.api, owner, memo.config.worker_image)
        except ApiError as exc:
            first = first_pass_failed(owner, exc) if exc.transient else None
            if first is not None:
                with contextlib.suppress(ApiError):  # the retry raised next writes it again
                    memo.api.patch_status(namespace, name, first)
            raise
        refused = _write_status(memo.api, owner, outcome.status_delta)
    for event in outcome.events:
        post(memo, owner, event)
    told = memo.status_refusals
    if refused is None:
        told.pop((namespace, name), None)
        return outcome
    message = api_error_message(refused)
    if told.get((namespace, name)) != message:
        told[namespace, name] = message
        post(memo, owner, Event("Warning", c.REASON_API_ERROR, message))
    raise refused


def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Converge the children on create, on every spec change, and when the operator starts.

    kopf's copy of the service only names it: the pass reads it afresh under the lock and writes
    the status itself, as every other trigger does (kopf would patch it after the lock is gone)."""
    metadata = body["metadata"]
    outcome = _converge(memo, metadata["namespace"], metadata["name"], post_through_kopf)
    if outcome is not None and outcome.invalid:
        raise kopf.PermanentError(outcome.invalid)


def child_changed(
    type: str | None,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A child changed or vanished: restore it and carry its status into the owner's status within seconds."""
    name = labels.get(c.LABEL_INSTANCE)
    if type is None or not name or not namespace:
        return  # the initial listing: resume already reconciles every service
    try:
        _converge(memo, namespace, name, post_through_kopf)
    except (ApiError, kopf.TemporaryError) as exc:
        # Event handlers are not retried: the resync loop or the next event will try again.
        logger.warning("could not reconcile %s/%s after a child change: %s", namespace, name, exc)


def build_registry() -> kopf.OperatorRegistry:
    """A kopf registry holding every handler (the resync interval comes from `memo.config`)."""
    registry = kopf.OperatorRegistry()
    # A fresh registry has none of kopf's default login handlers; we log in as our own client does.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.startup(registry=registry)(start_resync)
    kopf.on.cleanup(registry=registry)(stop)
    kopf.index(c.GROUP, c.VERSION, c.PLURAL, registry=registry)(services)
    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(c.GROUP, c.VERSION, c.PLURAL, registry=registry)(reconcile)
    for group, version, plural in WATCHED:
        kopf.on.event(group, version, plural, labels=CHILD_FILTER, registry=registry)(child_changed)
    return registry
