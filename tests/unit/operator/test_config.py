"""Operator configuration from DIFFUSION_OPERATOR_* env vars (names the chart relies on)."""

from __future__ import annotations

import pytest

from diffusion_operator.config import ConfigError, config_from_env
from diffusion_operator.constants import DEFAULT_WORKER_IMAGE


def test_defaults_watch_all_namespaces_with_json_logs_and_liveness_on_8080() -> None:
    config = config_from_env({})
    assert config.clusterwide and config.namespaces == ()
    assert config.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert config.worker_image == DEFAULT_WORKER_IMAGE
    assert config.log_format == "json"


def test_env_sets_namespaces_port_image_and_format() -> None:
    config = config_from_env({
        "DIFFUSION_OPERATOR_NAMESPACES": "team-a, team-b,,",
        "DIFFUSION_OPERATOR_LIVENESS_PORT": "9090",
        "DIFFUSION_OPERATOR_WORKER_IMAGE": "registry/worker:dev",
        "DIFFUSION_OPERATOR_LOG_FORMAT": "plain",
        "DIFFUSION_OPERATOR_RESYNC_SECONDS": "5",
    })  # fmt: skip
    assert config.namespaces == ("team-a", "team-b") and not config.clusterwide
    assert config.liveness_endpoint == "http://0.0.0.0:9090/healthz"
    assert config.worker_image == "registry/worker:dev"
    assert config.log_format == "plain"
    assert config.resync_seconds == 5


def test_liveness_listens_on_the_family_of_the_pods_ip() -> None:
    """The kubelet probes the pod's IP; kopf binds one host, and a `::` socket is IPv6-only."""
    ipv6 = config_from_env(
        {"DIFFUSION_OPERATOR_POD_IP": "fd00:10:244::5", "DIFFUSION_OPERATOR_LIVENESS_PORT": "9090"}
    )
    assert ipv6.liveness_endpoint == "http://[::]:9090/healthz"
    assert config_from_env({"DIFFUSION_OPERATOR_POD_IP": "10.244.0.5"}).liveness_endpoint == (
        "http://0.0.0.0:8080/healthz"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DIFFUSION_OPERATOR_LIVENESS_PORT", "http"),
        ("DIFFUSION_OPERATOR_LIVENESS_PORT", "70000"),
        ("DIFFUSION_OPERATOR_LOG_FORMAT", "xml"),
        ("DIFFUSION_OPERATOR_RESYNC_SECONDS", "-1"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config_from_env({key: value})
