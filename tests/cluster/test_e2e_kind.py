"""End to end on a real cluster: the CPU sample becomes Ready, serves an image, and is cleaned up.

Opt-in (marker `cluster`): `make e2e` runs it on a fresh kind cluster after `helm install`; against
another cluster run `pytest -m cluster tests/cluster/test_e2e_kind.py` with $KUBECONFIG pointing at a
cluster where the chart is installed. Skipped when no cluster or no CRD is reachable (a failure
under E2E_REQUIRE_CLUSTER=1, as `make e2e` sets).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "crds" / "samples"
CRD_NAME = "imagediffusionservices.imagediffusion.dev"
READY_TIMEOUT_S = int(os.environ.get("E2E_READY_TIMEOUT_S", "900"))
DELETE_TIMEOUT_S = 180  # kubectl delete --timeout, then as long again for the children to go
WORKER_FAILING_TIMEOUT_S = 300
OPENAI_TIMEOUT_S, OPENAI_MAX_RETRIES = 300, 2
KUBECTL_TIMEOUT_S = 120  # one kubectl call that does not wait on anything
CHILD_KINDS = ("deployments.apps", "services", "persistentvolumeclaims", "poddisruptionbudgets.policy")
# pytest-timeout counts fixture setup in the first test that needs it: the Ready wait plus the
# longest wait in any one test, plus room for the plain kubectl calls around them.
TEST_TIMEOUT_S = (
    READY_TIMEOUT_S
    + max(2 * DELETE_TIMEOUT_S, WORKER_FAILING_TIMEOUT_S, OPENAI_TIMEOUT_S * (1 + OPENAI_MAX_RETRIES))
    + 5 * KUBECTL_TIMEOUT_S
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(TEST_TIMEOUT_S)]


def kubectl_path() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(REPO / ".tools" / "bin"))
    if found is None:
        pytest.skip("kubectl not found on PATH or in .tools/bin (run `make tools`)")
    return found


def kubectl(
    *args: str, check: bool = True, timeout: float = KUBECTL_TIMEOUT_S, stdin: str | None = None
) -> str:
    """Run kubectl; returns stdout, fails the test with stderr on error when check is set."""
    # Never kill kubectl before a --timeout=Ns it was given runs out.
    for arg in args:
        if waits := re.fullmatch(r"--timeout=(\d+)s", arg):
            timeout = max(timeout, int(waits.group(1)) + 30)
    result = subprocess.run(
        [kubectl_path(), *args], capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json"))


@pytest.fixture(scope="module", autouse=True)
def reachable_cluster_with_crd() -> None:
    probe = subprocess.run(
        [kubectl_path(), "get", "--raw", "/readyz", "--request-timeout=5s"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no reachable Kubernetes cluster ($KUBECONFIG): {probe.stderr.strip()[:200]}")
    if subprocess.run([kubectl_path(), "get", "crd", CRD_NAME], capture_output=True).returncode != 0:
        pytest.skip(f"CRD {CRD_NAME} is not installed: helm install the chart first (make e2e does)")


def cpu_sample() -> dict[str, Any]:
    """The sample that runs the built-in tiny model without a GPU."""
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            if str(spec.get("model", {}).get("id", "")).startswith("builtin:") and (
                spec.get("resources", {}).get("gpus", 0) == 0
            ):
                return dict(doc)
    pytest.fail(f"no CPU sample (builtin model, gpus 0) in {SAMPLES}")


@dataclass
class ReadyService:
    namespace: str
    name: str
    uid: str
    status: dict[str, Any]
    children: list[tuple[str, str]]  # (kind, name) owned by the service


def owned_children(namespace: str, uid: str) -> list[tuple[str, str]]:
    children = []
    for kind in CHILD_KINDS:
        for item in kubectl_json("get", kind, "-n", namespace)["items"]:
            owners = item["metadata"].get("ownerReferences", [])
            if any(owner["uid"] == uid for owner in owners):
                children.append((kind, item["metadata"]["name"]))
    return children


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def ready_service(namespace: str) -> ReadyService:
    sample = cpu_sample()
    sample["metadata"].pop("namespace", None)
    name = sample["metadata"]["name"]
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(sample))
    wait = subprocess.run(
        [
            kubectl_path(),
            "wait",
            "-n",
            namespace,
            "--for=condition=Ready",
            f"imagediffusionservice/{name}",
            f"--timeout={READY_TIMEOUT_S}s",
        ],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S + 30,
    )
    obj = kubectl_json("get", "imagediffusionservice", name, "-n", namespace)
    assert wait.returncode == 0, f"not Ready in {READY_TIMEOUT_S}s: {json.dumps(obj.get('status'), indent=2)}"
    uid = obj["metadata"]["uid"]
    return ReadyService(namespace, name, uid, obj["status"], owned_children(namespace, uid))


def test_ready_service_reports_kstatus_and_endpoint(ready_service: ReadyService) -> None:
    status = ready_service.status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions.get("Stalled", {}).get("status", "False") == "False"
    assert status["endpoint"] == f"http://{ready_service.name}.{ready_service.namespace}.svc:8000/v1"
    assert status["readyReplicas"] >= 1
    kinds = {kind for kind, _ in ready_service.children}
    assert {"deployments.apps", "services", "poddisruptionbudgets.policy"} <= kinds


@pytest.fixture
def local_base_url(ready_service: ReadyService) -> Iterator[str]:
    """Port-forward to the worker Service named in status.endpoint; yields http://127.0.0.1:PORT/v1."""
    endpoint = urlparse(ready_service.status["endpoint"])
    assert endpoint.hostname is not None
    service = endpoint.hostname.split(".")[0]
    forward = subprocess.Popen(
        [
            kubectl_path(),
            "port-forward",
            "-n",
            ready_service.namespace,
            f"svc/{service}",
            f":{endpoint.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8000"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"port-forward said {line!r}"
        yield f"http://127.0.0.1:{match.group(1)}/v1"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_openai_client_gets_a_generated_image(ready_service: ReadyService, local_base_url: str) -> None:
    import openai
    from PIL import Image

    client = openai.OpenAI(
        base_url=local_base_url, api_key="unused", timeout=OPENAI_TIMEOUT_S, max_retries=OPENAI_MAX_RETRIES
    )
    models = [model.id for model in client.models.list()]
    assert ready_service.status["servedModel"] in models
    response = client.images.generate(
        model=ready_service.status["servedModel"],
        prompt="a red circle on a blue background",
        n=1,
        response_format="b64_json",
        extra_body={"nvext": {"num_inference_steps": 2, "seed": 0}},
    )
    assert response.data is not None
    assert len(response.data) == 1
    png = base64.b64decode(response.data[0].b64_json or "")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.width > 0
    assert image.height > 0
    out = REPO / "generated-images" / "e2e-kind.png"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(png)


def test_deleting_the_service_garbage_collects_its_children(ready_service: ReadyService) -> None:
    assert ready_service.children, "the service owned no children to collect"
    kubectl(
        "delete",
        "imagediffusionservice",
        ready_service.name,
        "-n",
        ready_service.namespace,
        f"--timeout={DELETE_TIMEOUT_S}s",
    )
    deadline = time.monotonic() + DELETE_TIMEOUT_S
    left = ready_service.children
    while left and time.monotonic() < deadline:
        time.sleep(2)
        left = [
            (kind, name)
            for kind, name in left
            if kubectl("get", kind, name, "-n", ready_service.namespace, "--ignore-not-found", "-o", "name")
        ]
    assert not left, f"children still present {DELETE_TIMEOUT_S}s after the service was deleted: {left}"


def test_a_worker_that_cannot_load_its_model_is_named_in_the_ready_condition(namespace: str) -> None:
    """A model path with nothing there: the worker exits with one clear line, the kubelet keeps it
    as the termination message (FallbackToLogsOnError), and the operator quotes it."""
    sample = cpu_sample()
    sample["metadata"] = {"name": "missing-model"}
    sample["spec"]["model"] = {
        key: value for key, value in sample["spec"]["model"].items() if key not in ("id", "path", "uri")
    } | {"path": "/models/missing"}
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(sample))
    deadline = time.monotonic() + WORKER_FAILING_TIMEOUT_S
    ready: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            status = kubectl_json("get", "imagediffusionservice", "missing-model", "-n", namespace).get(
                "status", {}
            )
            ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            if ready.get("reason") == "WorkerFailing":
                break
            time.sleep(3)
        waited = f"Ready condition after {WORKER_FAILING_TIMEOUT_S}s: {ready}"
        assert ready.get("reason") == "WorkerFailing", waited
        assert ready["status"] == "False"
        assert "cannot start: --model '/models/missing'" in ready["message"], ready["message"]
    finally:
        kubectl(
            "delete", "imagediffusionservice", "missing-model", "-n", namespace, "--wait=false", check=False
        )
