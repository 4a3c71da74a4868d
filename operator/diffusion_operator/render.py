"""Pure rendering: ServiceSpec + Meta -> the Deployment, Service, PodDisruptionBudget and PVC manifests
(no client, no I/O)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from diffusion_operator import constants as c
from diffusion_operator.spec import Meta, ServiceSpec

Manifest = dict[str, Any]


def model_cache_name(name: str) -> str:
    """Name of the model-cache PVC of service `name`."""
    return name + c.MODEL_CACHE_SUFFIX


def endpoint(spec: ServiceSpec, meta: Meta) -> str:
    """In-cluster base URL of the OpenAI images API."""
    return f"http://{meta.name}.{meta.namespace}.svc:{spec.service.port}/v1"


def selector_labels(meta: Meta) -> dict[str, str]:
    """Labels that select the worker pods; fixed for the life of the Deployment (selectors are immutable)."""
    return {c.LABEL_NAME: c.WORKER_APP_NAME, c.LABEL_INSTANCE: meta.name}


def selector_string(meta: Meta) -> str:
    """selector_labels as a label-selector string (status.selector, for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(meta).items()))


def child_labels(meta: Meta) -> dict[str, str]:
    """app.kubernetes.io/* labels on every child and pod."""
    return {
        **selector_labels(meta),
        c.LABEL_COMPONENT: c.WORKER_COMPONENT,
        c.LABEL_PART_OF: c.OPERATOR_NAME,
        c.LABEL_MANAGED_BY: c.OPERATOR_NAME,
    }


def owner_reference(meta: Meta) -> dict[str, Any]:
    """Makes a child garbage-collected with its ImageDiffusionService."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


ARGO_KEEP_ANNOTATIONS = {
    "argocd.argoproj.io/sync-options": "Prune=false",
    "argocd.argoproj.io/compare-options": "IgnoreExtraneous",
}


def _metadata(name: str, meta: Meta, *, owned: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"name": name, "namespace": meta.namespace, "labels": child_labels(meta)}
    if owned:
        result["ownerReferences"] = [owner_reference(meta)]
    return result


def content_hash(value: Any) -> str:
    """Stable short hash of JSON-like data."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _sets_env(spec: ServiceSpec, name: str) -> bool:
    return any(item.get("name") == name for item in spec.pod.env)


def worker_args(spec: ServiceSpec) -> list[str]:
    """`serve` and its flags; only set fields become flags, so unset ones keep worker defaults."""
    flags: list[tuple[str, Any]] = [
        ("--model", spec.model.source),
        ("--revision", spec.model.revision),
        ("--dtype", spec.model.dtype),
        ("--served-model-name", spec.model.served_name),
        ("--pipeline", spec.model.pipeline),
    ]
    if spec.storage is not None:
        flags += [
            ("--storage-url", spec.storage.url),
            ("--public-base-url", spec.storage.public_base_url),
            ("--url-expiry-seconds", spec.storage.url_expiry_seconds),
        ]
    flags += [
        ("--max-inference-steps", spec.limits.max_inference_steps),
        ("--max-images-per-request", spec.limits.max_images_per_request),
        ("--max-pixels", spec.limits.max_pixels),
        ("--max-batch-size", spec.limits.max_batch_size),
        ("--max-queue", spec.limits.max_queue),
        ("--default-inference-steps", spec.defaults.inference_steps),
        ("--default-guidance-scale", spec.defaults.guidance_scale),
        ("--default-size", spec.defaults.size),
    ]
    if spec.resources.gpus > 0 and not _sets_env(spec, c.ENV_DEVICE):
        # Without it the worker falls back to the CPU when torch sees no GPU (a node whose default
        # container runtime is not NVIDIA's and no spec.pod.runtimeClassName): it would load and
        # serve, just hundreds of times slower. With it, the worker stops at start-up instead, and
        # the pod's crash loop names the cause. `cuda`, not `cuda:0`: with data parallelism the
        # worker puts rank r on cuda:r, and context-parallel ranks pick their GPUs themselves.
        # Another accelerator (an Intel GPU's xpu) is named by DIFFUSION_WORKER_DEVICE in spec.pod.env.
        flags.append(("--device", "cuda"))
    if spec.parallelism.data_parallel != 1:
        flags.append(("--data-parallel-size", spec.parallelism.data_parallel))
    if spec.parallelism.context_parallel != 1:
        flags.append(("--context-parallel-size", spec.parallelism.context_parallel))
        flags.append(("--context-parallel-mode", spec.parallelism.context_parallel_mode))
    flags += [
        # Every IPv4 and IPv6 address: the kubelet probes the pod's primary IP, IPv6 on single-stack
        # IPv6 and IPv6-first dual-stack clusters (the worker opens a socket per family it has).
        ("--host", "::"),
        ("--port", c.WORKER_PORT),
        ("--cache-dir", c.MODEL_CACHE_MOUNT),
        ("--drain-timeout", c.WORKER_DRAIN_SECONDS),
    ]
    args = ["serve"]
    for flag, value in flags:
        if value is not None:
            args += [flag, str(value)]
    return args


def worker_env(spec: ServiceSpec) -> list[dict[str, Any]]:
    """Container env: writable cache dirs, Secret references (never their contents), then spec.pod.env
    (whose entries win over the operator's of the same name)."""
    env: list[dict[str, Any]] = [
        # The root filesystem is read-only: libraries that write under $HOME or ~/.cache write to /tmp.
        {"name": "HOME", "value": c.TMP_MOUNT},
        {"name": "XDG_CACHE_HOME", "value": f"{c.TMP_MOUNT}/.cache"},
        {"name": "HF_HOME", "value": f"{c.MODEL_CACHE_MOUNT}/huggingface"},
    ]
    if spec.resources.gpus == 0:
        # The CUDA base image sets NVIDIA_VISIBLE_DEVICES=all, and the device plugin replaces it
        # only for a container that asks for GPUs: where NVIDIA's runtime is the node's default
        # (the GPU Operator's set-up) a CPU worker would see every GPU of the node, and use ones
        # the scheduler gave to other pods. `void`: the runtime then adds no GPU at all.
        env.append({"name": c.ENV_NVIDIA_VISIBLE_DEVICES, "value": "void"})
    if spec.api_key_secret is not None:
        env.append(
            {
                "name": c.ENV_API_KEY,
                "valueFrom": {
                    "secretKeyRef": {"name": spec.api_key_secret.name, "key": spec.api_key_secret.key}
                },
            }
        )
    if spec.model.token_secret is not None:
        env.append(
            {
                "name": c.ENV_HF_TOKEN,
                "valueFrom": {
                    "secretKeyRef": {"name": spec.model.token_secret.name, "key": spec.model.token_secret.key}
                },
            }
        )
    # spec.pod.env replaces an entry of the same name (an env list with a name twice is rejected by
    # server-side apply, which would fail every pass); new names go last, in the spec's order.
    overrides = {item["name"]: copy.deepcopy(dict(item)) for item in spec.pod.env}
    merged = [overrides.pop(item["name"], item) for item in env]
    return merged + list(overrides.values())


def worker_resources(spec: ServiceSpec) -> dict[str, Any]:
    """Container resources: spec.resources.requests/limits plus `<gpuResourceName>: gpus` when gpus > 0."""
    limits: dict[str, Any] = dict(spec.resources.limits)
    if spec.resources.gpus > 0:
        limits[spec.resources.gpu_resource_name] = str(spec.resources.gpus)
    result: dict[str, Any] = {}
    if spec.resources.requests:
        result["requests"] = dict(spec.resources.requests)
    if limits:
        result["limits"] = limits
    return result


def startup_probe_failures(spec: ServiceSpec) -> int:
    """Failed startup probes allowed: enough to cover spec.rollout.startupTimeoutSeconds."""
    return -(-spec.rollout.startup_timeout_seconds // c.STARTUP_PROBE_PERIOD_SECONDS)


def progress_deadline_seconds(spec: ServiceSpec) -> int:
    """The Deployment's progress deadline: the startup budget plus time to schedule and pull, so a
    pod still loading its model never makes the rollout count as failed."""
    budget = startup_probe_failures(spec) * c.STARTUP_PROBE_PERIOD_SECONDS
    return budget + c.PROGRESS_DEADLINE_MARGIN_SECONDS


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": c.WORKER_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def worker_container(spec: ServiceSpec, image: str) -> dict[str, Any]:
    """The worker container of the pod template."""
    container: dict[str, Any] = {
        "name": c.WORKER_CONTAINER_NAME,
        "image": image,
        # No imagePullPolicy: Kubernetes' default pulls a :latest (or untagged) image on every
        # start and any other tag once, so a re-pushed development tag is not served stale.
        "command": list(c.WORKER_COMMAND),
        "args": worker_args(spec),
        "ports": [{"name": c.WORKER_PORT_NAME, "containerPort": c.WORKER_PORT, "protocol": "TCP"}],
        "env": worker_env(spec),
        # A worker that exits leaves its last log lines as the termination message, which the
        # operator quotes in the service's Ready condition (diffusion_operator.pods).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # /ready answers 200 once the pipeline is loaded; big models may take many minutes to download.
        "startupProbe": _probe(
            c.READY_PATH, period=c.STARTUP_PROBE_PERIOD_SECONDS, failures=startup_probe_failures(spec)
        ),
        "readinessProbe": _probe(c.READY_PATH, period=5, failures=3),
        "livenessProbe": _probe(c.HEALTH_PATH, period=10, failures=6),
        # Traffic routed to the pod before its endpoints removal reaches every proxy still lands.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(c.PRE_STOP_SLEEP_SECONDS)]}}},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": c.MODEL_CACHE_MOUNT},
            {"name": "tmp", "mountPath": c.TMP_MOUNT},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.storage is not None and spec.storage.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.storage.credentials_secret}}]
    resources = worker_resources(spec)
    if resources:
        container["resources"] = resources
    if spec.needs_shared_memory:
        container["volumeMounts"].append({"name": "shm", "mountPath": c.SHM_MOUNT})
    return container


def rollout_strategy(spec: ServiceSpec) -> dict[str, Any]:
    """maxSurge 0 (default): an update never needs a spare GPU, an old pod stops first. With a surge,
    no old pod stops before a new one is ready: a single-replica service keeps serving."""
    surge = spec.rollout.max_surge
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": surge, "maxUnavailable": 0 if surge else 1},
    }


def render_pod_template(spec: ServiceSpec, meta: Meta, image: str) -> dict[str, Any]:
    """The Deployment's pod template, with a config hash annotation that changes whenever the pod would."""
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": model_cache_name(meta.name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.needs_shared_memory:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    pod_spec: dict[str, Any] = {
        "containers": [worker_container(spec, image)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": c.TERMINATION_GRACE_SECONDS,
        "enableServiceLinks": False,
        # The Pod Security Standards' `restricted` profile (with the container's own settings), so
        # the pods start in namespaces that enforce it; fsGroup lets a non-root worker write the
        # model-cache volume whatever its uid.
        "securityContext": {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
            "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch",
        },
    }
    if spec.pod.node_selector:
        pod_spec["nodeSelector"] = dict(spec.pod.node_selector)
    if spec.pod.tolerations:
        pod_spec["tolerations"] = [copy.deepcopy(dict(t)) for t in spec.pod.tolerations]
    if spec.pod.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(spec.pod.affinity))
    if spec.pod.priority_class_name:
        pod_spec["priorityClassName"] = spec.pod.priority_class_name
    if spec.pod.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.pod.runtime_class_name
    if spec.pod.service_account_name:
        pod_spec["serviceAccountName"] = spec.pod.service_account_name
    labels = child_labels(meta)
    config_hash = content_hash(
        {"labels": labels, "annotations": dict(spec.pod.annotations), "spec": pod_spec}
    )
    return {
        "metadata": {
            "labels": labels,
            "annotations": {**spec.pod.annotations, c.ANNOTATION_CONFIG_HASH: config_hash},
        },
        "spec": pod_spec,
    }


def render_deployment(spec: ServiceSpec, meta: Meta, default_image: str = c.DEFAULT_WORKER_IMAGE) -> Manifest:
    """The worker Deployment; spec.image wins over the operator's default image."""
    image = spec.image or default_image
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(meta.name, meta),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(meta)},
            "strategy": rollout_strategy(spec),
            "progressDeadlineSeconds": progress_deadline_seconds(spec),
            "revisionHistoryLimit": 3,
            "template": render_pod_template(spec, meta, image),
        },
    }


def render_service(spec: ServiceSpec, meta: Meta) -> Manifest:
    """The Service in front of the worker pods (port `http`)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(meta.name, meta),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(meta),
            "ports": [
                {
                    "name": c.WORKER_PORT_NAME,
                    "port": spec.service.port,
                    "targetPort": c.WORKER_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_disruption_budget(spec: ServiceSpec, meta: Meta) -> Manifest:
    """At most one worker pod down for voluntary disruptions (node drains, the cluster autoscaler):
    a drain evicts one pod, then waits until its replacement is ready before the next. With one
    replica it allows the eviction (a budget of 0 would block every drain of that node)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(meta.name, meta),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(meta)}},
    }


def render_model_cache_pvc(spec: ServiceSpec, meta: Meta) -> Manifest:
    """The model-cache PVC; without an owner reference when modelCache.retainOnDelete is true."""
    pvc_spec: dict[str, Any] = {
        "accessModes": list(spec.model_cache.access_modes),
        "resources": {"requests": {"storage": spec.model_cache.size}},
    }
    if spec.model_cache.storage_class_name is not None:  # "": no class, not the default class
        pvc_spec["storageClassName"] = spec.model_cache.storage_class_name
    metadata = _metadata(model_cache_name(meta.name), meta, owned=not spec.model_cache.retain_on_delete)
    # Every child carries app.kubernetes.io/instance=NAME, Argo CD's tracking label before 3.0:
    # an Application named like the service would count a PVC without an owner reference (kept
    # on delete) as its own, missing from Git, and prune the downloaded weights.
    metadata["annotations"] = dict(ARGO_KEEP_ANNOTATIONS)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": pvc_spec}


def with_applied_hash(manifest: Mapping[str, Any]) -> Manifest:
    """A copy of `manifest` annotated with the hash of its own content (see ANNOTATION_APPLIED_HASH)."""
    result = copy.deepcopy(dict(manifest))
    annotations = result["metadata"].setdefault("annotations", {})
    annotations.pop(c.ANNOTATION_APPLIED_HASH, None)
    annotations[c.ANNOTATION_APPLIED_HASH] = content_hash(result)
    return result


def render_children(
    spec: ServiceSpec, meta: Meta, default_image: str = c.DEFAULT_WORKER_IMAGE
) -> list[Manifest]:
    """Every child, in apply order (the PVC before the pods that mount it), hash-annotated."""
    return [
        with_applied_hash(render_model_cache_pvc(spec, meta)),
        with_applied_hash(render_deployment(spec, meta, default_image)),
        with_applied_hash(render_service(spec, meta)),
        with_applied_hash(render_disruption_budget(spec, meta)),
    ]
