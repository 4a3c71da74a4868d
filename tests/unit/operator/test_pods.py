"""Why worker pods are not ready: pod statuses as the API server reports them, into one message,
and that message in the service's conditions."""

from __future__ import annotations

from typing import Any

from diffusion_operator import constants as c
from diffusion_operator.pods import EXCERPT_CHARS, worker_pod_problem
from diffusion_operator.render import child_labels
from diffusion_operator.spec import Meta, parse_spec
from diffusion_operator.status import Observed, judge

META = Meta(name="svc", namespace="ns", uid="u", generation=1)
SPEC = parse_spec({"model": {"id": "builtin:tiny-sd"}, "resources": {"gpus": 1}})
LOAD_FAILURE = (  # the worker's own last lines for a model path with nothing there
    "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to "
    "`CLIPImageProcessorPil` for backward compatibility.\n"
    "2026-12-01 05:07:35,073 ERROR diffusion_worker.server [-] cannot start: --model "
    "'/models/missing': no diffusers pipeline there (model_index.json not found)\n"
)


def pod(name: str, *, containers: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": child_labels(META)},
        "status": {"containerStatuses": containers or [], **status},
    }


def worker(state: dict[str, Any], restarts: int = 0, **more: Any) -> dict[str, Any]:
    return {"name": c.WORKER_CONTAINER_NAME, "state": state, "restartCount": restarts, **more}


CRASH_LOOP = pod(
    "svc-abc-2",
    containers=[
        worker(
            {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container",
                }
            },
            restarts=3,
            lastState={"terminated": {"exitCode": 1, "reason": "Error", "message": LOAD_FAILURE}},
        )
    ],
)
UNSCHEDULABLE = pod(
    "svc-abc-1",
    phase="Pending",
    conditions=[
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ],
)


def test_a_crash_looping_worker_is_reported_with_its_last_log_line() -> None:
    assert worker_pod_problem([CRASH_LOOP]) == (
        c.REASON_WORKER_FAILING,
        "worker pod svc-abc-2: CrashLoopBackOff, restarted 3 times; last exit 1: 2026-12-01 05:07:35,073 "
        "ERROR diffusion_worker.server [-] cannot start: --model '/models/missing': no diffusers pipeline "
        "there (model_index.json not found)",
    )


def test_a_killed_worker_without_logs_is_reported_by_its_termination_reason() -> None:
    killed = pod(
        "p",
        containers=[
            worker(
                {"waiting": {"reason": "CrashLoopBackOff"}},
                restarts=1,
                lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            )
        ],
    )
    assert worker_pod_problem([killed]) == (
        c.REASON_WORKER_FAILING,
        "worker pod p: CrashLoopBackOff, restarted 1 times; last exit 137: OOMKilled",
    )


def test_waiting_reasons_that_name_their_cause_are_quoted() -> None:
    missing_secret = pod(
        "p",
        containers=[
            worker(
                {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'secret "sdxl-s3" not found',
                    }
                }
            )
        ],
    )
    assert worker_pod_problem([missing_secret]) == (
        c.REASON_WORKER_FAILING,
        'worker pod p: CreateContainerConfigError: secret "sdxl-s3" not found',
    )


def test_a_long_log_line_is_cut_from_the_start_so_its_end_survives() -> None:
    line = "x" * 1000 + " the cause"
    crashed = pod("p", containers=[worker({"terminated": {"exitCode": 70, "message": line}}, restarts=0)])
    reason, message = worker_pod_problem([crashed]) or ("", "")
    assert reason == c.REASON_WORKER_FAILING
    assert message.startswith("worker pod p: the worker exited; last exit 70: ...xxx")
    assert message.endswith("the cause")
    assert len(message) < EXCERPT_CHARS + 100


def test_a_failing_container_comes_before_an_unschedulable_pod_and_either_before_nothing() -> None:
    assert worker_pod_problem([UNSCHEDULABLE, CRASH_LOOP]) == worker_pod_problem([CRASH_LOOP])
    assert worker_pod_problem([UNSCHEDULABLE]) == (
        c.REASON_WORKER_UNSCHEDULABLE,
        "worker pod svc-abc-1 cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )


def test_starting_running_or_terminating_pods_are_no_problem() -> None:
    loading = pod("a", containers=[worker({"running": {"startedAt": "T"}}, ready=False)])
    creating = pod("b", containers=[worker({"waiting": {"reason": "ContainerCreating"}})])
    deleting = {**CRASH_LOOP, "metadata": {**CRASH_LOOP["metadata"], "deletionTimestamp": "T"}}
    sidecar = pod("c", containers=[{"name": "proxy", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    assert worker_pod_problem([loading, creating, deleting, sidecar]) is None


def rolling_out(**conditions: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "svc", "generation": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "updatedReplicas": 1,
            "conditions": [{"type": t, "status": "False", "reason": r} for t, r in conditions.items()],
        },
    }


def test_the_problem_becomes_the_ready_and_reconciling_reason_not_stalled() -> None:
    verdict = judge(SPEC, META, Observed(deployment=rolling_out(), pods=[CRASH_LOOP]))
    assert verdict.ready[:2] == (False, c.REASON_WORKER_FAILING)
    assert verdict.ready[2].startswith(
        "rolling out: 1/1 worker pods updated, 0 available; worker pod svc-abc-2"
    )
    assert verdict.reconciling == (True, *verdict.ready[1:])
    assert verdict.stalled == (False, c.REASON_AS_EXPECTED, "")


def test_a_stalled_rollout_names_the_pod_problem_too() -> None:
    deployment = rolling_out(Progressing="ProgressDeadlineExceeded")
    verdict = judge(SPEC, META, Observed(deployment=deployment, pods=[UNSCHEDULABLE]))
    assert verdict.stalled[:2] == (True, c.REASON_ROLLOUT_STALLED)
    assert verdict.stalled[2].endswith("; worker pod svc-abc-1 cannot be scheduled: 0/3 nodes are available: "
                                       "3 Insufficient nvidia.com/gpu.")  # fmt: skip
