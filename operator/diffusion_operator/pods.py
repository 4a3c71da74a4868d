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

# Waiting reasons that mean the container will not start without a change or a retry.
FAILING_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
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
    detail = _last_line(terminated.get("message") or "") or terminated.get("reason") or ""
    return f"; last exit {terminated.get('exitCode', '?')}" + (f": {detail}" if detail else "")


def _failing_container(pod: Mapping[str, Any]) -> str | None:
    name = pod["metadata"]["name"]
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if status.get("name") != c.WORKER_CONTAINER_NAME:
            continue
        waiting = (status.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        terminated = (status.get("state") or {}).get("terminated") or {}
        if reason in FAILING_WAITING_REASONS:
            restarts = int(status.get("restartCount", 0))
            what = f"worker pod {name}: {reason}"
            if reason == "CrashLoopBackOff":
                return f"{what}, restarted {restarts} times{_last_exit(status)}"
            message = _last_line(waiting.get("message") or "")
            return f"{what}" + (f": {message}" if message else "")
        if terminated and int(terminated.get("exitCode", 0)) != 0:
            return f"worker pod {name}: the worker exited{_last_exit(status)}"
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


def worker_pod_problem(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(condition reason, message) for the first pod, by name, that fails or cannot be placed;
    a failing container first (it names its cause), then a pod no node can take. None: no problem
    the pods can tell (they may just be starting or loading the model)."""
    live = [pod for pod in sorted(pods, key=lambda pod: pod["metadata"]["name"])
            if pod["metadata"].get("deletionTimestamp") is None]  # fmt: skip
    for reason, explain in (
        (c.REASON_WORKER_FAILING, _failing_container),
        (c.REASON_WORKER_UNSCHEDULABLE, _unschedulable),
    ):
        for pod in live:
            if message := explain(pod):
                return reason, message
    return None
