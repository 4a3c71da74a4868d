"""Render: pure functions from spec to manifests; args are checked with the worker's own parser."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from diffusion_operator import constants as c
from diffusion_operator.render import (
    endpoint,
    render_children,
    render_deployment,
    render_disruption_budget,
    render_model_cache_pvc,
    render_service,
    worker_args,
)
from diffusion_operator.spec import Meta, ServiceSpec, parse_spec
from diffusion_worker.engine import ModelLoadError, select_devices
from diffusion_worker.settings import settings_from_args
from support.idsvc_schema import SAMPLES, apply_defaults, load_sample, load_schema

META = Meta(name="svc", namespace="team-a", uid="uid-1", generation=3)
# The chart's kubeVersion floor, and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.25", kubernetes_validate.utils.latest_version())


def spec_of(**fields: Any) -> ServiceSpec:
    return parse_spec({"model": {"id": "builtin:tiny-sd"}, **fields})


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return result


FULL = {
    "model": {
        "id": "stabilityai/sdxl",
        "revision": "v2",
        "dtype": "float16",
        "servedName": "sdxl",
        "pipeline": "StableDiffusionXLPipeline",
    },
    "resources": {"gpus": 2},
    "parallelism": {"contextParallel": 2, "contextParallelMode": "ring"},
    "storage": {"url": "s3://bucket/images", "publicBaseUrl": "https://cdn.example/x",
                "urlExpirySeconds": 600},
    "limits": {"maxInferenceSteps": 80, "maxImagesPerRequest": 6, "maxPixels": 1048576, "maxBatchSize": 3,
               "maxQueue": 30},
    "defaults": {"inferenceSteps": 25, "guidanceScale": 6.5, "size": "512x512"},
}  # fmt: skip


def test_rendered_args_parse_with_the_workers_own_parser_and_match_the_spec() -> None:
    args = container(render_deployment(parse_spec(FULL), META))["args"]
    assert args[0] == "serve"
    settings = settings_from_args(args[1:])
    assert settings.model == "stabilityai/sdxl"
    assert settings.revision == "v2"
    assert settings.dtype == "float16"
    assert settings.served_model_name == "sdxl"
    assert settings.pipeline == "StableDiffusionXLPipeline"
    assert settings.storage_url == "s3://bucket/images"
    assert settings.public_base_url == "https://cdn.example/x"
    assert settings.url_expiry_seconds == 600
    assert settings.max_inference_steps == 80
    assert settings.max_images_per_request == 6
    assert settings.max_pixels == 1048576
    assert settings.max_batch_size == 3
    assert settings.max_queue == 30
    assert settings.default_inference_steps == 25
    assert settings.default_guidance_scale == 6.5
    assert settings.default_size == "512x512"
    assert settings.data_parallel_size == 1
    assert (settings.context_parallel_size, settings.context_parallel_mode) == (2, "ring")
    assert (settings.host, settings.port, str(settings.cache_dir)) == ("::", 8000, "/models")


def test_data_parallel_renders_its_flag() -> None:
    spec = {**FULL, "resources": {"gpus": 2}, "parallelism": {"dataParallel": 2}}
    settings = settings_from_args(container(render_deployment(parse_spec(spec), META))["args"][1:])
    assert (settings.data_parallel_size, settings.context_parallel_size) == (2, 1)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_renders_args_the_worker_accepts(path: Any) -> None:
    sample = apply_defaults(load_schema(), load_sample(path))
    spec = parse_spec(sample["spec"])
    settings = settings_from_args(container(render_deployment(spec, META))["args"][1:])
    assert settings.model == spec.model.source
    assert settings.effective_served_model_name == spec.served_model


def test_unset_fields_pass_no_flags_so_worker_defaults_hold() -> None:
    args = worker_args(spec_of())
    assert args == [
        "serve", "--model", "builtin:tiny-sd",
        "--device", "cuda",  # resources.gpus defaults to 1
        "--host", "::", "--port", "8000", "--cache-dir", "/models", "--drain-timeout", "265",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"resources": {"gpus": 1}},
        {"resources": {"gpus": 2}, "parallelism": {"dataParallel": 2}},
        {"resources": {"gpus": 2}, "parallelism": {"contextParallel": 2}},
    ],
    ids=["one-gpu", "data-parallel", "context-parallel"],
)
def test_a_gpu_worker_is_told_to_use_cuda_so_a_pod_without_its_gpus_fails_loudly(
    fields: dict[str, Any],
) -> None:
    """Left to itself the worker picks the CPU when torch sees no GPU (no NVIDIA runtime on k3s,
    RKE2, Talos without spec.pod.runtimeClassName) and serves, hundreds of times slower. `cuda`, not
    `cuda:0`: the worker spreads data-parallel ranks over cuda:0..N-1 from it, and context-parallel
    ranks take cuda:RANK whatever --device says."""
    settings = settings_from_args(worker_args(spec_of(**fields))[1:])
    assert settings.device == "cuda"


def test_a_device_named_in_the_pod_env_is_not_overridden() -> None:
    """An accelerator torch calls something else (an Intel GPU's xpu) is named in spec.pod.env; a
    rendered --device would win over it."""
    spec = spec_of(pod={"env": [{"name": "DIFFUSION_WORKER_DEVICE", "value": "xpu"}]})
    assert "--device" not in worker_args(spec)


def test_the_rendered_device_makes_a_worker_that_sees_no_gpu_refuse_to_start() -> None:
    """On a GPU-less machine the worker's own device selection, given the rendered flags, stops
    with the message the pod's crash loop then shows in the Ready condition."""
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("needs a machine where torch sees no GPU")
    for parallelism in ({}, {"dataParallel": 2}):
        gpus = parallelism.get("dataParallel", 1)
        spec = spec_of(resources={"gpus": gpus}, parallelism=parallelism)
        with pytest.raises(ModelLoadError, match="--device cuda: 0 CUDA devices visible"):
            select_devices(settings_from_args(worker_args(spec)[1:]))


def test_a_cpu_worker_gets_no_device_flag() -> None:
    """gpus 0: NVIDIA_VISIBLE_DEVICES=void already hides a GPU node's cards, so the worker's default
    (cuda when present) runs on the CPU."""
    assert "--device" not in worker_args(spec_of(resources={"gpus": 0}))


@pytest.mark.parametrize(
    "source", [{"path": "/models/pipe"}, {"uri": "s3://bucket/pipe"}, {"id": "org/model"}]
)
def test_model_id_path_or_uri_becomes_model_flag(source: dict[str, str]) -> None:
    args = worker_args(parse_spec({"model": source}))
    assert args[args.index("--model") + 1] == next(iter(source.values()))


def test_deployment_runs_the_worker_image_command_and_port() -> None:
    main = container(render_deployment(spec_of(), META))
    assert main["image"] == c.DEFAULT_WORKER_IMAGE
    assert main["command"] == ["python", "-m", "diffusion_worker"]
    assert main["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_spec_image_wins_over_operator_default_image() -> None:
    assert (
        container(render_deployment(spec_of(), META, "registry/worker:dev"))["image"] == "registry/worker:dev"
    )
    spec = spec_of(image="mine/worker:1")
    assert container(render_deployment(spec, META, "registry/worker:dev"))["image"] == "mine/worker:1"


def test_gpu_limit_follows_spec_gpus_and_resource_name() -> None:
    spec = spec_of(resources={"gpus": 2, "gpuResourceName": "amd.com/gpu", "limits": {"memory": "8Gi"}},
                   parallelism={"dataParallel": 2})  # fmt: skip
    resources = container(render_deployment(spec, META))["resources"]
    assert resources["limits"] == {"memory": "8Gi", "amd.com/gpu": "2"}


def test_cpu_service_requests_no_gpu() -> None:
    resources = container(render_deployment(spec_of(resources={"gpus": 0}), META)).get("resources", {})
    assert not any("gpu" in key for key in resources.get("limits", {}))


def test_probes_use_ready_and_health_with_a_long_startup_budget() -> None:
    main = container(render_deployment(spec_of(), META))
    assert main["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = main["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] == 45 * 60


@pytest.mark.parametrize("timeout", [60, 7200, 7205, 86400])
def test_startup_timeout_sets_the_startup_probe_budget_and_the_progress_deadline(timeout: int) -> None:
    """A model copied from s3:// at start can take longer than 45 minutes; the worker opens its port
    only once loaded. The probe must allow at least the timeout (less would restart the pod before
    it loads, forever), and the Deployment's deadline must outlast the probe (shorter, a pod still
    loading would turn the service RolloutStalled)."""
    deployment = render_deployment(spec_of(rollout={"startupTimeoutSeconds": timeout}), META)
    startup = container(deployment)["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert timeout <= budget < timeout + startup["periodSeconds"]
    assert deployment["spec"]["progressDeadlineSeconds"] == budget + 600


def test_volumes_mount_model_cache_tmp_and_shm_only_when_multi_gpu() -> None:
    single = render_deployment(spec_of(), META)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in single["containers"][0]["volumeMounts"]}
    assert mounts == {"/models": "model-cache", "/tmp": "tmp"}
    claim = next(v for v in single["volumes"] if v["name"] == "model-cache")
    assert claim["persistentVolumeClaim"]["claimName"] == "svc-model-cache"
    multi = render_deployment(spec_of(resources={"gpus": 2}, parallelism={"dataParallel": 2}), META)
    pod = multi["spec"]["template"]["spec"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_secret_references_become_env_value_from_and_env_from() -> None:
    spec = spec_of(
        auth={"apiKeySecretRef": {"name": "keys"}},
        model={"id": "x", "tokenSecretRef": {"name": "hf", "key": "tok"}},
        storage={"url": "s3://b/p", "credentialsSecretRef": {"name": "s3"}},
    )
    main = container(render_deployment(spec, META))
    env = {e["name"]: e for e in main["env"]}
    assert env["DIFFUSION_WORKER_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "keys", "key": "api-key"}
    }
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert main["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert "value" not in env["DIFFUSION_WORKER_API_KEY"]


def test_storage_without_a_url_still_sets_expiry_and_credentials() -> None:
    spec = spec_of(
        model={"uri": "s3://models/sd15"},
        storage={"urlExpirySeconds": 600, "credentialsSecretRef": {"name": "s3"}},
    )
    main = container(render_deployment(spec, META))
    assert "--storage-url" not in main["args"]
    assert main["args"][main["args"].index("--url-expiry-seconds") + 1] == "600"
    assert main["envFrom"] == [{"secretRef": {"name": "s3"}}]


def test_pod_env_replaces_an_operator_variable_of_the_same_name_and_appends_the_rest() -> None:
    """A name twice in a container's env makes server-side apply reject the Deployment, which would
    fail every pass; the user's entry wins, in the operator's entry's place."""
    pod = {"env": [{"name": "EXTRA", "value": "1"}, {"name": "HF_HOME", "value": "/models/hub"}]}
    env = container(render_deployment(spec_of(pod=pod), META))["env"]
    names = [item["name"] for item in env]
    assert names == ["HOME", "XDG_CACHE_HOME", "HF_HOME", "EXTRA"]
    assert env[2] == {"name": "HF_HOME", "value": "/models/hub"}


def test_a_worker_without_gpus_is_shown_none_of_the_nodes_gpus() -> None:
    """The CUDA base image sets NVIDIA_VISIBLE_DEVICES=all; only a container that asks for GPUs
    gets the device plugin's value instead, so a CPU worker on a node whose default runtime is
    NVIDIA's would otherwise run on GPUs the scheduler gave to other pods."""
    cpu = {e["name"]: e for e in container(render_deployment(spec_of(resources={"gpus": 0}), META))["env"]}
    assert cpu["NVIDIA_VISIBLE_DEVICES"] == {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}
    gpu = container(render_deployment(spec_of(resources={"gpus": 1}), META))
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in gpu["env"]}
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def _restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standards' `restricted` checks (kubernetes.io/docs/concepts/security/
    pod-security-standards, v1.31) that a pod template can fail, as messages."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}  # fmt: skip
    for volume in pod.get("volumes") or ():
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']} of type {kinds - allowed_volumes}")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(key)
    for item in pod["containers"] + (pod.get("initContainers") or []):
        context = item.get("securityContext") or {}
        name = item["name"]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or ()):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or ()) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(port.get("hostPort") for port in item.get("ports") or ()):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_worker_pods_meet_the_restricted_pod_security_standard(path: Any) -> None:
    """Namespaces that enforce `restricted` reject non-compliant pods at the ReplicaSet, where
    nothing but the Deployment's ReplicaFailure condition says so."""
    spec = parse_spec(apply_defaults(load_schema(), load_sample(path))["spec"])
    pod = render_deployment(spec, META)["spec"]["template"]["spec"]
    assert _restricted_violations(pod) == []
    assert _restricted_violations({**pod, "securityContext": {}})  # the checker can fail


def test_runtime_class_and_service_account_pass_through() -> None:
    """runtimeClassName: nvidia gives a GPU pod NVIDIA's runtime where it is not the node's default
    (k3s, RKE2, Talos); serviceAccountName carries workload identity or IRSA per service."""
    pod = {"runtimeClassName": "nvidia", "serviceAccountName": "sdxl-storage"}
    template = render_deployment(spec_of(pod=pod), META)["spec"]["template"]
    assert template["spec"]["runtimeClassName"] == "nvidia"
    assert template["spec"]["serviceAccountName"] == "sdxl-storage"
    unset = render_deployment(spec_of(), META)["spec"]["template"]["spec"]
    assert "runtimeClassName" not in unset and "serviceAccountName" not in unset


def test_image_pull_policy_is_left_to_kubernetes() -> None:
    """Kubernetes pulls :latest on every start and other tags once: a fixed IfNotPresent kept
    serving a stale :latest (or a re-pushed development tag) on nodes that had pulled it before."""
    assert "imagePullPolicy" not in container(render_deployment(spec_of(image="me/worker:latest"), META))


def test_pod_settings_pass_through() -> None:
    pod = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"x": 1}},
        "env": [{"name": "DIFFUSION_WORKER_LOG_LEVEL", "value": "debug"}],
        "annotations": {"prometheus.io/scrape": "true"},
        "priorityClassName": "high",
    }
    template = render_deployment(spec_of(pod=pod), META)["spec"]["template"]
    assert template["spec"]["nodeSelector"] == pod["nodeSelector"]
    assert template["spec"]["tolerations"] == pod["tolerations"]
    assert template["spec"]["affinity"] == pod["affinity"]
    assert template["spec"]["priorityClassName"] == "high"
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert {"name": "DIFFUSION_WORKER_LOG_LEVEL", "value": "debug"} in template["spec"]["containers"][0][
        "env"
    ]


def test_labels_selector_and_owner_reference() -> None:
    deployment = render_deployment(spec_of(), META)
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "image-diffusion-operator"
    assert labels["app.kubernetes.io/instance"] == "svc"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    (owner,) = deployment["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "svc", "uid": "uid-1",
                     "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def test_config_hash_changes_when_the_pod_would_and_only_then() -> None:
    def config_hash(spec: ServiceSpec) -> str:
        template = render_deployment(spec, META)["spec"]["template"]
        result: str = template["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]
        return result

    base = config_hash(spec_of())
    assert config_hash(spec_of()) == base
    assert config_hash(spec_of(replicas=5, modelCache={"accessModes": ["ReadWriteMany"]})) == base
    assert config_hash(spec_of(limits={"maxQueue": 9})) != base
    assert config_hash(spec_of(pod={"annotations": {"a": "b"}})) != base


def test_rollout_stops_an_old_pod_first_unless_a_surge_is_allowed() -> None:
    """Default: no spare GPU needed. With a surge, no old pod stops before a new one is ready, so a
    single-replica service keeps serving through an update."""
    default = render_deployment(spec_of(), META)["spec"]["strategy"]
    assert default == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    surged = render_deployment(spec_of(rollout={"maxSurge": 1}), META)["spec"]["strategy"]
    assert surged == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_termination_grace_lets_in_flight_images_finish() -> None:
    pod = render_deployment(spec_of(), META)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    drain = settings_from_args(pod["containers"][0]["args"][1:]).drain_timeout
    [pre_stop_sleep] = [
        int(word) for word in pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1:]
    ]
    assert grace >= 60
    assert pre_stop_sleep + drain < grace, "the worker finishes draining before the kubelet's SIGKILL"


def test_service_is_cluster_ip_on_port_http() -> None:
    service = render_service(spec_of(), META)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    custom = render_service(spec_of(service={"type": "LoadBalancer", "port": 80}), META)
    assert custom["spec"]["type"] == "LoadBalancer" and custom["spec"]["ports"][0]["port"] == 80


def test_model_cache_pvc_follows_spec_and_is_kept_when_asked() -> None:
    pvc = render_model_cache_pvc(
        spec_of(modelCache={"size": "10Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]}),
        META,
    )
    assert pvc["metadata"]["name"] == "svc-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}},
                           "storageClassName": "fast"}  # fmt: skip
    assert pvc["metadata"]["ownerReferences"]
    kept = render_model_cache_pvc(spec_of(modelCache={"retainOnDelete": True}), META)
    assert "ownerReferences" not in kept["metadata"]
    # Argo CD (label tracking) never prunes the weights of a kept cache as an extraneous object.
    assert kept["metadata"]["annotations"] == {
        "argocd.argoproj.io/sync-options": "Prune=false",
        "argocd.argoproj.io/compare-options": "IgnoreExtraneous",
    }


def test_an_empty_storage_class_means_no_class_and_an_absent_one_the_default() -> None:
    """In Kubernetes storageClassName "" binds a PersistentVolume created beforehand without a class;
    dropped, the claim would get the cluster's default class and provision a new volume instead."""
    none = render_model_cache_pvc(spec_of(modelCache={"storageClassName": ""}), META)
    assert none["spec"]["storageClassName"] == ""
    default = render_model_cache_pvc(spec_of(), META)
    assert "storageClassName" not in default["spec"]


def test_children_carry_an_applied_hash_and_come_in_apply_order() -> None:
    children = render_children(spec_of(), META)
    assert [child["kind"] for child in children] == [
        "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
    ]  # fmt: skip
    assert all(c.ANNOTATION_APPLIED_HASH in child["metadata"]["annotations"] for child in children)
    again = render_children(spec_of(), META)
    assert children == again


def test_disruption_budget_lets_a_drain_take_one_worker_pod_at_a_time() -> None:
    budget = render_disruption_budget(spec_of(replicas=3), META)
    deployment = render_deployment(spec_of(replicas=3), META)
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["metadata"]["ownerReferences"] == deployment["metadata"]["ownerReferences"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_child_of_every_sample_is_valid_kubernetes(path: Path, version: str) -> None:
    """Strict (unknown fields are errors, as server-side apply makes them) against the oldest
    Kubernetes the chart supports and the newest kubernetes-validate knows."""
    spec = parse_spec(apply_defaults(load_schema(), load_sample(path))["spec"])
    for child in render_children(spec, META):
        kubernetes_validate.validate(child, version, strict=True)


def test_endpoint_names_service_namespace_and_port() -> None:
    assert endpoint(spec_of(), META) == "http://svc.team-a.svc:8000/v1"
    assert endpoint(spec_of(service={"port": 80}), META) == "http://svc.team-a.svc:80/v1"


def test_a_worker_option_without_a_spec_field_is_set_through_pod_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/operator.md promises for spec.pod.env: the rendered env plus the rendered flags
    give the worker's settings (the env var is applied as the kubelet would)."""
    spec = copy.deepcopy(FULL)
    spec["pod"] = {"env": [{"name": "DIFFUSION_WORKER_VAE_TILING", "value": "true"}]}
    main = container(render_deployment(parse_spec(spec), META))
    for item in main["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    assert settings_from_args(main["args"][1:]).vae_tiling is True
