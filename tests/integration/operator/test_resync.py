"""The resync loop on its own: with every child watch of the operator cut, only the periodic pass
can see a Deployment become available, and it must carry that into the status and post the
`Available` Event itself (kopf's Event poster exists only inside kopf's handlers).

Emulated instead of real: kube-apiserver and the Deployment controller, as in test_operator.py. The
cut watch is an emulator rule that answers the operator's Deployment watch requests with an empty
stream, which is how a watch the API server ends looks to kopf.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import kmock
import pytest

from support.kube_emulator import EmulatorThread
from support.operator_harness import Kubectl, OperatorThread, emulated_cluster, tiny, wait_for

pytestmark = pytest.mark.integration


def operator_watch_of_deployments(request: kmock.Request) -> bool:
    """A watch request on Deployments from the operator (the test's own client is python-requests)."""
    return (
        request.params.get("watch") in ("true", "1")
        and "/deployments" in str(request.url)
        and not request.headers.get("User-Agent", "").startswith("python-requests")
    )


def test_resync_alone_brings_status_to_ready_and_posts_the_event(tmp_path: Path) -> None:
    with emulated_cluster(tmp_path) as cluster:
        cut_watches = _cut(cluster)
        kubectl = Kubectl(cluster, "resync-" + uuid.uuid4().hex[:6])
        operator = OperatorThread(resync_seconds=1).start()
        try:
            kubectl.apply(tiny())
            wait_for("the Deployment", lambda: kubectl.child("deployments", "tiny"))
            kubectl.mark_deployment_available("tiny", 1)
            wait_for("Ready=True", lambda: (kubectl.condition("tiny", "Ready") or {}).get("status") == "True")
            available = wait_for(
                "the Available event",
                lambda: [event for event in kubectl.events() if event["reason"] == "Available"],
            )
        finally:
            operator.stop()
        assert cut_watches.requests, "the operator never tried to watch Deployments: nothing was cut"
    [event] = available
    assert event["involvedObject"]["kind"] == "ImageDiffusionService"
    assert event["involvedObject"]["name"] == "tiny"
    assert event["source"]["component"] == "image-diffusion-operator"


class _Cut:
    """Counts the watch requests the rule answered."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, request: kmock.Request) -> bool:
        if operator_watch_of_deployments(request):
            self.requests += 1
            return True
        return False


def _cut(cluster: EmulatorThread) -> _Cut:
    rule = _Cut()
    cluster.emulator[rule] << kmock.Response(status=200, payload=b"")
    return rule
