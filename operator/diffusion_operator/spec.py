"""Typed, defaulted view of an ImageDiffusionService spec, and the checks CEL cannot express."""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from diffusion_operator import constants as c


class InvalidSpecError(ValueError):
    """The spec passed the schema but cannot be served; it will not fix itself."""


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    """A key in a Secret of the service's namespace."""

    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """spec.model: what to serve."""

    source: str  # the --model value: the id, path or uri, whichever is set
    revision: str | None = None
    dtype: str | None = None
    served_name: str | None = None
    pipeline: str | None = None
    token_secret: SecretKeyRef | None = None


@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    """spec.resources."""

    gpus: int = 1
    gpu_resource_name: str = c.DEFAULT_GPU_RESOURCE
    requests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    limits: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ParallelismSpec:
    """spec.parallelism."""

    data_parallel: int = 1
    context_parallel: int = 1
    context_parallel_mode: str = "ulysses"


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    """spec.storage."""

    url: str | None = None
    public_base_url: str | None = None
    url_expiry_seconds: int | None = None
    credentials_secret: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelCacheSpec:
    """spec.modelCache."""

    size: str = c.DEFAULT_MODEL_CACHE_SIZE
    storage_class_name: str | None = None  # None: the default class; "": none (a PV made beforehand)
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)
    retain_on_delete: bool = False


@dataclasses.dataclass(frozen=True)
class LimitsSpec:
    """spec.limits: unset fields keep the worker's defaults."""

    max_inference_steps: int | None = None
    max_images_per_request: int | None = None
    max_pixels: int | None = None
    max_batch_size: int | None = None
    max_queue: int | None = None


@dataclasses.dataclass(frozen=True)
class DefaultsSpec:
    """spec.defaults: unset fields keep the pipeline's defaults."""

    inference_steps: int | None = None
    guidance_scale: float | None = None
    size: str | None = None


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """spec.service."""

    type: str = "ClusterIP"
    port: int = c.DEFAULT_SERVICE_PORT


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """spec.rollout: how worker pods start, and the Deployment's rolling update."""

    max_surge: int = 0
    startup_timeout_seconds: int = c.DEFAULT_STARTUP_TIMEOUT_SECONDS


@dataclasses.dataclass(frozen=True)
class PodSpec:
    """spec.pod: passed through to the pod template."""

    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    service_account_name: str | None = None


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """The whole spec, defaults applied."""

    model: ModelSpec
    replicas: int = 1
    rollout: RolloutSpec = dataclasses.field(default_factory=RolloutSpec)
    resources: ResourcesSpec = dataclasses.field(default_factory=ResourcesSpec)
    parallelism: ParallelismSpec = dataclasses.field(default_factory=ParallelismSpec)
    storage: StorageSpec | None = None
    model_cache: ModelCacheSpec = dataclasses.field(default_factory=ModelCacheSpec)
    limits: LimitsSpec = dataclasses.field(default_factory=LimitsSpec)
    defaults: DefaultsSpec = dataclasses.field(default_factory=DefaultsSpec)
    api_key_secret: SecretKeyRef | None = None
    image: str | None = None
    service: NetworkSpec = dataclasses.field(default_factory=NetworkSpec)
    pod: PodSpec = dataclasses.field(default_factory=PodSpec)

    @property
    def served_model(self) -> str:
        """The name clients pass as `model`."""
        return self.model.served_name or self.model.source

    @property
    def needs_shared_memory(self) -> bool:
        """Multi-GPU pods exchange tensors through /dev/shm; the container default (64Mi) is too small."""
        return (
            self.resources.gpus > 1
            or self.parallelism.data_parallel > 1
            or self.parallelism.context_parallel > 1
        )


@dataclasses.dataclass(frozen=True)
class Meta:
    """Identity of the ImageDiffusionService that children belong to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


_SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpecError(f"spec.{key} must be an object, got {value!r}")
    return value


def _secret_ref(value: Any, default_key: str, where: str) -> SecretKeyRef | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value.get("name"):
        raise InvalidSpecError(f"{where} needs a Secret name, got {value!r}")
    return SecretKeyRef(name=str(value["name"]), key=str(value.get("key") or default_key))


def _quantities(value: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()}


def parse_model(model: Mapping[str, Any]) -> ModelSpec:
    """spec.model, with exactly one source."""
    sources = [str(model[k]) for k in ("id", "path", "uri") if model.get(k)]
    if len(sources) != 1:
        raise InvalidSpecError(f"set exactly one of spec.model.id, path and uri, got {len(sources)}")
    pipeline = model.get("pipeline")
    if pipeline is not None and pipeline not in c.KNOWN_PIPELINES:
        known = ", ".join(sorted(c.KNOWN_PIPELINES))
        raise InvalidSpecError(
            f"spec.model.pipeline {pipeline!r} is not a known text-to-image diffusers pipeline; "
            f"use one of: {known}"
        )
    return ModelSpec(
        source=sources[0],
        revision=model.get("revision"),
        dtype=model.get("dtype"),
        served_name=model.get("servedName"),
        pipeline=pipeline,
        token_secret=_secret_ref(
            model.get("tokenSecretRef"), c.DEFAULT_TOKEN_KEY, "spec.model.tokenSecretRef"
        ),
    )


def _rollout(rollout: Mapping[str, Any]) -> RolloutSpec:
    return RolloutSpec(
        max_surge=int(rollout.get("maxSurge", 0)),
        startup_timeout_seconds=int(
            rollout.get("startupTimeoutSeconds") or c.DEFAULT_STARTUP_TIMEOUT_SECONDS
        ),
    )


def parse_spec(spec: Mapping[str, Any]) -> ServiceSpec:
    """Turn a CR's spec into a ServiceSpec with defaults applied; raise InvalidSpecError if it cannot run."""
    if not isinstance(spec.get("model"), Mapping):
        raise InvalidSpecError("spec.model is required")
    model = parse_model(spec["model"])
    resources = _section(spec, "resources")
    parallelism = _section(spec, "parallelism")
    storage = _section(spec, "storage")
    cache = _section(spec, "modelCache")
    limits = _section(spec, "limits")
    defaults = _section(spec, "defaults")
    service = _section(spec, "service")
    pod = _section(spec, "pod")
    auth = _section(spec, "auth")

    parsed = ServiceSpec(
        model=model,
        replicas=int(spec.get("replicas", 1)),
        rollout=_rollout(_section(spec, "rollout")),
        resources=ResourcesSpec(
            gpus=int(resources.get("gpus", 1)),
            gpu_resource_name=str(resources.get("gpuResourceName") or c.DEFAULT_GPU_RESOURCE),
            requests=_quantities(resources.get("requests") or {}),
            limits=_quantities(resources.get("limits") or {}),
        ),
        parallelism=ParallelismSpec(
            data_parallel=int(parallelism.get("dataParallel", 1)),
            context_parallel=int(parallelism.get("contextParallel", 1)),
            context_parallel_mode=str(parallelism.get("contextParallelMode", "ulysses")),
        ),
        # Each field stands alone: urlExpirySeconds also times the worker's own file URLs, and the
        # credentials also serve model.uri, so neither needs a url.
        storage=StorageSpec(
            url=storage.get("url") or None,
            public_base_url=storage.get("publicBaseUrl"),
            url_expiry_seconds=storage.get("urlExpirySeconds"),
            credentials_secret=(storage.get("credentialsSecretRef") or {}).get("name"),
        )
        if storage
        else None,
        model_cache=ModelCacheSpec(
            size=str(cache.get("size") or c.DEFAULT_MODEL_CACHE_SIZE),
            storage_class_name=cache.get("storageClassName"),
            access_modes=tuple(cache.get("accessModes") or ("ReadWriteOnce",)),
            retain_on_delete=bool(cache.get("retainOnDelete", False)),
        ),
        limits=LimitsSpec(
            max_inference_steps=limits.get("maxInferenceSteps"),
            max_images_per_request=limits.get("maxImagesPerRequest"),
            max_pixels=limits.get("maxPixels"),
            max_batch_size=limits.get("maxBatchSize"),
            max_queue=limits.get("maxQueue"),
        ),
        defaults=DefaultsSpec(
            inference_steps=defaults.get("inferenceSteps"),
            guidance_scale=defaults.get("guidanceScale"),
            size=defaults.get("size"),
        ),
        api_key_secret=_secret_ref(
            auth.get("apiKeySecretRef"), c.DEFAULT_API_KEY_KEY, "spec.auth.apiKeySecretRef"
        ),
        image=spec.get("image") or None,
        service=NetworkSpec(
            type=str(service.get("type") or "ClusterIP"),
            port=int(service.get("port") or c.DEFAULT_SERVICE_PORT),
        ),
        pod=PodSpec(
            node_selector={str(k): str(v) for k, v in (pod.get("nodeSelector") or {}).items()},
            tolerations=tuple(pod.get("tolerations") or ()),
            affinity=pod.get("affinity") or None,
            env=tuple(pod.get("env") or ()),
            annotations={str(k): str(v) for k, v in (pod.get("annotations") or {}).items()},
            priority_class_name=pod.get("priorityClassName") or None,
            runtime_class_name=pod.get("runtimeClassName") or None,
            service_account_name=pod.get("serviceAccountName") or None,
        ),
    )
    validate_beyond_schema(parsed)
    return parsed


def validate_beyond_schema(spec: ServiceSpec) -> None:
    """Checks the CRD's CEL rules cannot make (string parsing, and rules CEL's cost budget would not
    admit); raise InvalidSpecError on failure."""
    if spec.rollout.max_surge > 0 and "ReadWriteOncePod" in spec.model_cache.access_modes:
        raise InvalidSpecError(
            "spec.rollout.maxSurge above 0 needs a model cache two pods can mount: "
            "modelCache.accessModes ReadWriteOncePod admits one pod, so the new pod would never start"
        )
    if spec.storage is not None and spec.storage.url is not None:
        check_storage_url(spec.storage.url)
    size = spec.defaults.size
    if size is not None:
        match = _SIZE.match(size)
        if match is None:
            raise InvalidSpecError(f"spec.defaults.size must be WIDTHxHEIGHT, got {size!r}")
        width, height = int(match.group(1)), int(match.group(2))
        if width % 8 or height % 8:
            raise InvalidSpecError(f"spec.defaults.size must have both sides multiples of 8, got {size!r}")
        max_pixels = spec.limits.max_pixels or c.WORKER_DEFAULT_MAX_PIXELS
        if width * height > max_pixels:
            raise InvalidSpecError(
                f"spec.defaults.size {size!r} has {width * height} pixels, "
                f"more than limits.maxPixels {max_pixels}"
            )


def check_storage_url(url: str) -> None:
    """A file:// storage url must lie in one of the worker's writable mounts: its root filesystem is
    read-only, so anywhere else every url request would fail with 500. The CRD's CEL rule says the
    same; this holds under a CRD installed before that rule too."""
    if not url.startswith("file:"):
        return
    roots = ", ".join(f"{root}/" for root in c.WRITABLE_MOUNTS)
    path = url.removeprefix("file://")
    normalized = posixpath.normpath(path) if path.startswith("/") else ""
    if not any(normalized.startswith(f"{root}/") for root in c.WRITABLE_MOUNTS):
        raise InvalidSpecError(
            f"spec.storage.url {url!r} is not writable by the worker (its root filesystem is "
            f"read-only): use file:// with a path under {roots} or an s3:// or gs:// URL"
        )
