"""Names with one home: the API, labels, annotations, the field manager, condition types and reasons."""

from __future__ import annotations

from typing import Final

# --- the API ---
GROUP: Final = "imagediffusion.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "imagediffusionservices"
KIND: Final = "ImageDiffusionService"
API_VERSION: Final = f"{GROUP}/{VERSION}"

# --- who writes ---
OPERATOR_NAME: Final = "image-diffusion-operator"
FIELD_MANAGER: Final = OPERATOR_NAME

# --- labels on every child (app.kubernetes.io/* recommended labels) ---
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_VERSION: Final = "app.kubernetes.io/version"
WORKER_APP_NAME: Final = "diffusion-worker"
WORKER_COMPONENT: Final = "worker"

# --- annotations ---
# On the pod template: changes whenever the rendered pod spec changes, so a spec change rolls the pods.
ANNOTATION_CONFIG_HASH: Final = f"{GROUP}/config-hash"
# On each child: hash of the whole rendered object, to skip applies that would change nothing.
ANNOTATION_APPLIED_HASH: Final = f"{GROUP}/applied-hash"
# kopf's own bookkeeping, under our prefix rather than kopf.zalando.org.
KOPF_PREFIX: Final = GROUP
FINALIZER: Final = f"{GROUP}/finalizer"

# --- the worker contract ---
DEFAULT_WORKER_IMAGE: Final = "ghcr.io/image-diffusion-operator/worker:0.1.0"
WORKER_CONTAINER_NAME: Final = "worker"
WORKER_COMMAND: Final = ("python", "-m", "diffusion_worker")
WORKER_PORT: Final = 8000
WORKER_PORT_NAME: Final = "http"
MODEL_CACHE_MOUNT: Final = "/models"
TMP_MOUNT: Final = "/tmp"
# The worker's only writable paths (its root filesystem is read-only): where file:// storage may go.
WRITABLE_MOUNTS: Final = (MODEL_CACHE_MOUNT, TMP_MOUNT)
SHM_MOUNT: Final = "/dev/shm"
HEALTH_PATH: Final = "/health"
READY_PATH: Final = "/ready"
ENV_API_KEY: Final = "DIFFUSION_WORKER_API_KEY"
ENV_DEVICE: Final = "DIFFUSION_WORKER_DEVICE"
ENV_HF_TOKEN: Final = "HF_TOKEN"
ENV_NVIDIA_VISIBLE_DEVICES: Final = "NVIDIA_VISIBLE_DEVICES"
MODEL_CACHE_SUFFIX: Final = "-model-cache"
# The worker opens its port only once the model is loaded, so the startup probe's budget is the
# time a pod may take to download and load it (spec.rollout.startupTimeoutSeconds).
STARTUP_PROBE_PERIOD_SECONDS: Final = 10
# The Deployment's progress deadline is the startup budget plus this, for scheduling and the image
# pull: shorter, a pod still loading its model would mark the rollout failed (RolloutStalled).
PROGRESS_DEADLINE_MARGIN_SECONDS: Final = 600
# Long enough for a queue of in-flight images to finish after SIGTERM (readiness drops first).
TERMINATION_GRACE_SECONDS: Final = 300
# Before SIGTERM, the worker keeps serving this long (a preStop sleep): a terminating pod leaves the
# Service's endpoints at once, but kube-proxy and ingress controllers learn of it seconds later,
# and connections they open meanwhile must still find the port open.
PRE_STOP_SLEEP_SECONDS: Final = 5
# The worker finishes accepted requests within this after SIGTERM, then exits 0 before the kubelet's
# SIGKILL at TERMINATION_GRACE_SECONDS (which counts from the start of the preStop sleep).
WORKER_DRAIN_SECONDS: Final = TERMINATION_GRACE_SECONDS - PRE_STOP_SLEEP_SECONDS - 30

# --- defaults the CRD also declares (the operator applies them too, so it never relies on the server) ---
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"
DEFAULT_MODEL_CACHE_SIZE: Final = "50Gi"
DEFAULT_SERVICE_PORT: Final = 8000
# A big model (tens of GB) downloads and loads well within this.
DEFAULT_STARTUP_TIMEOUT_SECONDS: Final = 45 * 60
DEFAULT_TOKEN_KEY: Final = "token"
DEFAULT_API_KEY_KEY: Final = "api-key"
WORKER_DEFAULT_MAX_INFERENCE_STEPS: Final = 50
WORKER_DEFAULT_MAX_PIXELS: Final = 2048 * 2048

# Text-to-image diffusers pipeline classes the operator accepts for spec.model.pipeline.
KNOWN_PIPELINES: Final = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "SanaPipeline",
        "QwenImagePipeline",
        "AuraFlowPipeline",
        "CogView4Pipeline",
        "HiDreamImagePipeline",
        "Lumina2Pipeline",
        "KandinskyV22CombinedPipeline",
        "StableCascadeCombinedPipeline",
        "LatentConsistencyModelPipeline",
        "HunyuanDiTPipeline",
        "KolorsPipeline",
    }
)

# --- conditions (kstatus: Ready, Reconciling, Stalled) ---
CONDITION_READY: Final = "Ready"
CONDITION_RECONCILING: Final = "Reconciling"
CONDITION_STALLED: Final = "Stalled"

REASON_AVAILABLE: Final = "Available"  # Ready=True
REASON_SCALED_TO_ZERO: Final = "ScaledToZero"  # Ready=True with replicas 0
REASON_ROLLING_OUT: Final = "RollingOut"  # Reconciling=True, Ready=False
REASON_PROGRESSING: Final = "Progressing"  # Reconciling=True on the first pass
REASON_RECONCILED: Final = "Reconciled"  # Reconciling=False
REASON_AS_EXPECTED: Final = "AsExpected"  # Stalled=False
REASON_INVALID_SPEC: Final = "InvalidSpec"  # Stalled=True
REASON_MODEL_CACHE_UNBOUND: Final = "ModelCacheUnbound"  # Stalled=True: the PVC lost its volume
REASON_ROLLOUT_STALLED: Final = "RolloutStalled"  # Stalled=True: Deployment exceeded its progress deadline
REASON_WORKER_FAILING: Final = "WorkerFailing"  # Ready=False: a worker pod crashes or cannot start
REASON_WORKER_UNSCHEDULABLE: Final = "WorkerUnschedulable"  # Ready=False: no node can take a worker pod
REASON_WORKER_PODS_REJECTED: Final = "WorkerPodsRejected"  # Ready=False: the ReplicaSet cannot create pods
REASON_WORKERS_UNAVAILABLE: Final = "WorkersUnavailable"  # Ready=False: pods lost after a completed rollout
REASON_API_ERROR: Final = "ApiError"  # Stalled=True: the API server refuses a read or write (e.g. 403)
REASON_WAITING_FOR_DELETION: Final = "WaitingForDeletion"  # Reconciling=True: an earlier child of a name goes
REASON_APPLY_FAILED: Final = "ApplyFailed"  # event reason
REASON_CREATED: Final = "Created"  # event reason
REASON_UPDATED: Final = "Updated"  # event reason
