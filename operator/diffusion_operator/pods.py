"""Why worker pods are not ready, in one line for a condition message (pure; pods as the API gives them).

A Deployment only says "0 available"; the reason a platform team needs (no node has a free GPU, the
image cannot be pulled, the storage Secret is missing, the worker exits because the model does not
load) is on its pods. The worker container renders with `terminationMessagePolicy:
FallbackToLogsOnError`, so a worker that exits leaves its last log line as the termination message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_operator import constants as c

# Waiting reasons that mean the container will not start without a change or a retry. Not
# ErrImagePull: the kubelet's first failed pull (a registry's 503), which it retries as it does a
# first crash; a pull that keeps failing turns into ImagePullBackOff. The kubelet then shows
# ErrImagePull again on every retry, so once the service reports WorkerFailing, ErrImagePull counts
# as failing too: otherwise the verdict, Stalled and the Warning flip with each retry.
FAILING_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
EXCERPT_CHARS = 300


def _last_line(text: str) -> str:
    """The last non-empty line of `text`, cut to EXCERPT_CHARS from its end."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= EXCERPT_CHARS else "..." + line[-EXCERPT_CHARS:]


def _last_exit(status: Mapping[str, Any]) -> str:
    """'last exit 1: <last log line>' from a container status (lastState or a fresh termination)."""
    terminated = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get(
        "terminated"
    )
    if not terminated:
        return ""
    # With FallbackToLogsOnError the message is the log's tail, which says nothing of an OOM kill.
    code, reason = terminated.get("exitCode", "?"), terminated.get("reason") or ""
    message = _last_line(terminated.get("message") or "")
    if not message:
        return f"; last exit {code}" + (f": {reason}" if reason else "")
    named = f" ({reason})" if reason and reason not in ("Error", "Completed") else ""
    return f"; last exit {code}{named}: {message}"


def _crashed_before(status: Mapping[str, Any]) -> bool:
    """In a crash loop, running again and not ready since: between two crashes the container runs
    (loading the model) in state `running`, and judging only the current state flipped the verdict
    (and posted the Warning) at every restart. A loop is at least two crashes (restartCount >= 2,
    the last one failed): the kubelet goes Error(0) -> Running(1) -> Error(1) -> CrashLoopBackOff(1)
    -> Running(2), each of which from Error(1) on is failing, so the verdict stays put once the loop
    is established, while a single restart (one liveness kill, one OOM) reloading the model is not."""
    last = (status.get("lastState") or {}).get("terminated") or {}
    return (
        int(status.get("restartCount", 0)) >= 2
        and int(last.get("exitCode", 0)) != 0
        and not status.get("ready", False)
    )


def _failing_status(
    status: Mapping[str, Any], what: str, exited: str = "the worker exited", *, was_failing: bool = False
) -> str | None:
    """Why the container of `status` fails, prefixed with `what`; None while it may yet start, and
    for one that finished its work (an init container done, exit 0). `was_failing`: the service
    already reports WorkerFailing, so an ErrImagePull is a retry of a failing pull."""
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    terminated = (status.get("state") or {}).get("terminated")
    exit_code = int(terminated.get("exitCode", 0)) if terminated else None
    restarts = int(status.get("restartCount", 0))
    if exit_code == 0:
        return None
    if reason in FAILING_WAITING_REASONS or (was_failing and reason == "ErrImagePull"):
        if reason == "CrashLoopBackOff":
            return f"{what}: {reason}, restarted {restarts} times{_last_exit(status)}"
        message = _last_line(waiting.get("message") or "")
        return f"{what}: {reason}" + (f": {message}" if message else "")
    # A first failed run is the kubelet's to retry (a node under pressure, a flaky mount): failing
    # once it has been restarted and failed again, or runs again in a crash loop, not ready since.
    if exit_code and restarts > 0:
        return f"{what}: {exited}{_last_exit(status)}"
    if _crashed_before(status):
        return f"{what}: restarted {restarts} times, not ready since{_last_exit(status)}"
    return None


def _failing_container(pod: Mapping[str, Any], was_failing: bool) -> str | None:
    name = pod["metadata"]["name"]
    pod_status = pod.get("status") or {}
    # Init containers first: injected ones (a service mesh's, a secrets agent's) that fail keep the
    # worker waiting in PodInitializing, which says nothing.
    for status in pod_status.get("initContainerStatuses") or ():
        init = f"worker pod {name}: init container {status.get('name')}"
        if problem := _failing_status(status, init, exited="it exited", was_failing=was_failing):
            return problem
    for status in pod_status.get("containerStatuses") or ():
        if status.get("name") == c.WORKER_CONTAINER_NAME and (
            problem := _failing_status(status, f"worker pod {name}", was_failing=was_failing)
        ):
            return problem
    return None


def _unschedulable(pod: Mapping[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or ():
        if (condition.get("type"), condition.get("status"), condition.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            message = _last_line(condition.get("message") or "no node fits")
            return f"worker pod {pod['metadata']['name']} cannot be scheduled: {message}"
    return None


def worker_pod_problem(
    pods: Sequence[Mapping[str, Any]], *, was_failing: bool = False
) -> tuple[str, str] | None:
    """(condition reason, message) for the first pod, by name, that fails or cannot be placed;
    a failing container first (it names its cause), then a pod no node can take. None: no problem
    the pods can tell (they may just be starting or loading the model). `was_failing`: the
    service's Ready reason is already WorkerFailing (an ErrImagePull is then a retry, not a first try)."""
    # Not pods being deleted, nor pods that ended (evicted, or left by a node shutdown: they stay
    # until pod garbage collection, and their replacements are what runs).
    live = [pod for pod in sorted(pods, key=lambda pod: pod["metadata"]["name"])
            if pod["metadata"].get("deletionTimestamp") is None
            and (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded")]  # fmt: skip
    for pod in live:
        if message := _failing_container(pod, was_failing):
            return c.REASON_WORKER_FAILING, message
    for pod in live:
        if message := _unschedulable(pod):
            return c.REASON_WORKER_UNSCHEDULABLE, message
    return None
