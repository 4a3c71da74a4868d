"""Operator runtime configuration, read from DIFFUSION_OPERATOR_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Literal

from diffusion_operator.constants import DEFAULT_WORKER_IMAGE

ENV_NAMESPACES = "DIFFUSION_OPERATOR_NAMESPACES"
ENV_LIVENESS_PORT = "DIFFUSION_OPERATOR_LIVENESS_PORT"
ENV_WORKER_IMAGE = "DIFFUSION_OPERATOR_WORKER_IMAGE"
ENV_LOG_FORMAT = "DIFFUSION_OPERATOR_LOG_FORMAT"
ENV_RESYNC_SECONDS = "DIFFUSION_OPERATOR_RESYNC_SECONDS"
ENV_POD_IP = "DIFFUSION_OPERATOR_POD_IP"  # the chart sets it from status.podIP

LogFormat = Literal["json", "plain"]


class ConfigError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """What the operator process is told at start-up."""

    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    liveness_port: int = 8080
    worker_image: str = DEFAULT_WORKER_IMAGE
    log_format: LogFormat = "json"
    # Safety net: every service is re-checked this often even when no watch event arrives.
    resync_seconds: float = 60.0
    pod_ip: str = ""

    @property
    def clusterwide(self) -> bool:
        """Whether the operator watches all namespaces."""
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str:
        """kopf's liveness URL (GET .../healthz answers 200 while the operator is alive), on the
        family of the pod's IP, which the kubelet probes: kopf binds one host, and a `::` socket is
        IPv6-only, so IPv4 unless the pod's IP is IPv6 (single-stack IPv6, IPv6-first dual-stack)."""
        host = "[::]" if ":" in self.pod_ip else "0.0.0.0"
        return f"http://{host}:{self.liveness_port}/healthz"


def config_from_env(environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """Read the DIFFUSION_OPERATOR_* variables; unset or empty ones keep their defaults."""
    env = os.environ if environ is None else environ
    namespaces = tuple(ns.strip() for ns in env.get(ENV_NAMESPACES, "").split(",") if ns.strip())
    port_text = env.get(ENV_LIVENESS_PORT, "").strip() or "8080"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{ENV_LIVENESS_PORT} must be a port number 1-65535, got {port_text!r}")
    log_format = env.get(ENV_LOG_FORMAT, "").strip().lower() or "json"
    if log_format not in ("json", "plain"):
        raise ConfigError(f"{ENV_LOG_FORMAT} must be json or plain, got {log_format!r}")
    resync_text = env.get(ENV_RESYNC_SECONDS, "").strip() or "60"
    try:
        resync = float(resync_text)
    except ValueError:
        resync = 0.0
    if resync <= 0:
        raise ConfigError(f"{ENV_RESYNC_SECONDS} must be a positive number of seconds, got {resync_text!r}")
    return OperatorConfig(
        namespaces=namespaces,
        liveness_port=int(port_text),
        worker_image=env.get(ENV_WORKER_IMAGE, "").strip() or DEFAULT_WORKER_IMAGE,
        log_format="json" if log_format == "json" else "plain",
        resync_seconds=resync,
        pod_ip=env.get(ENV_POD_IP, "").strip(),
    )
