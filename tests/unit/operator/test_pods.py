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
    crashed = pod("p", containers=[worker({"terminated": {"exitCode": 70, "message": line}}, restarts=1)])
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


def test_a_crash_loop_is_failing_between_crashes_too() -> None:
    """Between two crashes the worker runs (loading the model) before it crashes again; judged on
    its current state alone, the verdict (Stalled) flipped and the Warning was posted at every
    restart."""
    last = {"terminated": {"exitCode": 1, "message": "cannot start: out of memory"}}
    loading_again = pod(
        "p", containers=[worker({"running": {"startedAt": "T"}}, restarts=4, ready=False, lastState=last)]
    )
    assert worker_pod_problem([loading_again]) == (
        c.REASON_WORKER_FAILING,
        "worker pod p: restarted 4 times, not ready since; last exit 1: cannot start: out of memory",
    )
    recovered = pod(
        "p", containers=[worker({"running": {"startedAt": "T"}}, restarts=4, ready=True, lastState=last)]
    )
    assert worker_pod_problem([recovered]) is None


def test_a_first_failure_the_kubelet_retries_is_no_problem_yet() -> None:
    """One failed pull (a registry's 503) or one exit: the kubelet retries both."""
    pull = pod("p", containers=[worker({"waiting": {"reason": "ErrImagePull", "message": "503"}})])
    exited = pod("q", containers=[worker({"terminated": {"exitCode": 137, "reason": "Error"}})])
    assert worker_pod_problem([pull, exited]) is None
    backoff = pod("p", containers=[worker({"waiting": {"reason": "ImagePullBackOff", "message": "503"}})])
    assert worker_pod_problem([backoff]) == (c.REASON_WORKER_FAILING, "worker pod p: ImagePullBackOff: 503")


def test_an_oom_kill_is_named_beside_the_last_log_line() -> None:
    """FallbackToLogsOnError makes the log's tail the termination message, which says nothing of
    the kill."""
    killed = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "INFO loading unet weights"}}
    looping = pod(
        "p", containers=[worker({"waiting": {"reason": "CrashLoopBackOff"}}, restarts=2, lastState=killed)]
    )
    assert worker_pod_problem([looping]) == (
        c.REASON_WORKER_FAILING,
        "worker pod p: CrashLoopBackOff, restarted 2 times; "
        "last exit 137 (OOMKilled): INFO loading unet weights",
    )


def test_a_failing_init_container_is_named() -> None:
    """An injected init container (a mesh's, a secrets agent's) that fails keeps the worker in
    PodInitializing, which says nothing."""
    stuck = pod(
        "p",
        containers=[worker({"waiting": {"reason": "PodInitializing"}})],
        initContainerStatuses=[
            {"name": "istio-init", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 5}
        ],
    )
    assert worker_pod_problem([stuck]) == (
        c.REASON_WORKER_FAILING,
        "worker pod p: init container istio-init: CrashLoopBackOff, restarted 5 times",
    )


def test_pods_that_ended_are_not_blamed() -> None:
    """An evicted pod (phase Failed) stays until pod garbage collection; its replacement is what runs."""
    evicted = pod(
        "a-evicted",
        containers=[
            worker({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}}, restarts=1)
        ],
        phase="Failed",
        reason="Evicted",
    )
    loading = pod("b", containers=[worker({"running": {"startedAt": "T"}}, ready=False)])
    assert worker_pod_problem([evicted, loading]) is None


def test_an_init_container_that_finished_after_a_crash_is_no_problem() -> None:
    crashed_once = {"terminated": {"exitCode": 1, "message": "vault not reachable"}}
    done = pod(
        "p",
        containers=[worker({"running": {"startedAt": "T"}}, ready=False)],
        initContainerStatuses=[
            {"name": "vault-agent-init", "state": {"terminated": {"exitCode": 0}}, "restartCount": 1,
             "lastState": crashed_once, "ready": False}
        ],
    )  # fmt: skip
    assert worker_pod_problem([done]) is None


PULL_ERROR = {"waiting": {"reason": "ErrImagePull", "message": "rpc error: 403 Forbidden"}}
PULL_BACKOFF = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "w:2"'}}


def test_an_image_pull_retry_of_a_failing_service_stays_failing() -> None:
    """The kubelet shows ErrImagePull on every retry of a pull in back-off: once the service says
    WorkerFailing, the retry must not clear it (Stalled, and the Warning, flipped at every retry)."""
    retrying = pod("p", containers=[worker(PULL_ERROR)], phase="Pending")
    assert worker_pod_problem([retrying]) is None, "a first failed pull is the kubelet's to retry"
    assert worker_pod_problem([retrying], was_failing=True) == (
        c.REASON_WORKER_FAILING,
        "worker pod p: ErrImagePull: rpc error: 403 Forbidden",
    )
    backing_off = pod("p", containers=[worker(PULL_BACKOFF)], phase="Pending")
    for was_failing in (False, True):
        assert worker_pod_problem([backing_off], was_failing=was_failing) == (
            c.REASON_WORKER_FAILING,
            'worker pod p: ImagePullBackOff: Back-off pulling image "w:2"',
        )


def kubelet_crash_loop() -> list[tuple[str, dict[str, Any]]]:
    """The worker's container status at each step of a crash loop, as the kubelet reports it."""
    exited = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    running = {"running": {"startedAt": "T"}}
    backoff = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
    return [
        ("Error(0)", worker(exited, restarts=0)),
        ("Running(1)", worker(running, restarts=1, ready=False, lastState=exited)),
        ("Error(1)", worker(exited, restarts=1, lastState=exited)),
        ("CrashLoopBackOff(1)", worker(backoff, restarts=1, lastState=exited)),
        ("Running(2)", worker(running, restarts=2, ready=False, lastState=exited)),
        ("Error(2)", worker(exited, restarts=2, lastState=exited)),
        ("CrashLoopBackOff(2)", worker(backoff, restarts=2, lastState=exited)),
        ("Running(3)", worker(running, restarts=3, ready=False, lastState=exited)),
    ]


def test_one_restart_is_no_problem_and_a_crash_loop_is_one_from_its_second_crash_on() -> None:
    """One liveness kill or OOM, then the model reloading, is not a crash loop; from the second
    crash on the verdict holds through every state of the loop, running between crashes included."""
    verdicts = [
        (step, worker_pod_problem([pod("p", containers=[status])]) is not None)
        for step, status in kubelet_crash_loop()
    ]
    assert verdicts == [
        ("Error(0)", False),
        ("Running(1)", False),
        ("Error(1)", True),
        ("CrashLoopBackOff(1)", True),
        ("Running(2)", True),
        ("Error(2)", True),
        ("CrashLoopBackOff(2)", True),
        ("Running(3)", True),
    ]
