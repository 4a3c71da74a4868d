"""Spec parsing: defaults applied by the operator itself, and the checks CEL cannot make."""

from __future__ import annotations

import pytest

from diffusion_operator.spec import InvalidSpecError, parse_spec


def test_minimal_spec_gets_the_crd_defaults() -> None:
    spec = parse_spec({"model": {"id": "builtin:tiny-sd"}})
    assert spec.replicas == 1
    assert spec.resources.gpus == 1 and spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert (spec.parallelism.data_parallel, spec.parallelism.context_parallel) == (1, 1)
    assert spec.model_cache.size == "50Gi" and spec.model_cache.access_modes == ("ReadWriteOnce",)
    assert not spec.model_cache.retain_on_delete
    assert spec.service.type == "ClusterIP" and spec.service.port == 8000
    assert spec.storage is None and spec.api_key_secret is None


def test_served_model_is_served_name_else_the_model_string() -> None:
    assert parse_spec({"model": {"id": "org/m"}}).served_model == "org/m"
    assert parse_spec({"model": {"id": "org/m", "servedName": "m"}}).served_model == "m"


def test_secret_keys_default() -> None:
    spec = parse_spec(
        {"model": {"id": "x", "tokenSecretRef": {"name": "hf"}}, "auth": {"apiKeySecretRef": {"name": "k"}}}
    )
    assert spec.model.token_secret is not None and spec.model.token_secret.key == "token"
    assert spec.api_key_secret is not None and spec.api_key_secret.key == "api-key"


def test_unknown_pipeline_is_invalid_and_names_it() -> None:
    with pytest.raises(InvalidSpecError, match="NotARealPipeline"):
        parse_spec({"model": {"id": "x", "pipeline": "NotARealPipeline"}})


def test_known_pipeline_is_accepted() -> None:
    assert parse_spec({"model": {"id": "x", "pipeline": "FluxPipeline"}}).model.pipeline == "FluxPipeline"


@pytest.mark.parametrize(
    ("defaults", "limits", "match"),
    [
        ({"size": "1000x7"}, {}, "multiples of 8"),
        ({"size": "4096x4096"}, {}, "maxPixels"),
        ({"size": "1024x1024"}, {"maxPixels": 65536}, "maxPixels"),
    ],
)
def test_default_size_must_fit_the_worker(
    defaults: dict[str, str], limits: dict[str, int], match: str
) -> None:
    with pytest.raises(InvalidSpecError, match=match):
        parse_spec({"model": {"id": "x"}, "defaults": defaults, "limits": limits})


def test_exactly_one_model_source_is_checked_again_in_python() -> None:
    with pytest.raises(InvalidSpecError, match="exactly one"):
        parse_spec({"model": {"id": "x", "path": "/y"}})
    with pytest.raises(InvalidSpecError, match="required"):
        parse_spec({})


def test_multi_gpu_or_parallel_pods_need_shared_memory() -> None:
    assert not parse_spec({"model": {"id": "x"}}).needs_shared_memory
    assert parse_spec({"model": {"id": "x"}, "resources": {"gpus": 2}}).needs_shared_memory
    assert parse_spec(
        {"model": {"id": "x"}, "resources": {"gpus": 0}, "parallelism": {"dataParallel": 2}}
    ).needs_shared_memory


def test_a_rollout_surge_needs_a_cache_two_pods_can_mount() -> None:
    assert parse_spec({"model": {"id": "x"}}).rollout.max_surge == 0
    assert parse_spec({"model": {"id": "x"}, "rollout": {"maxSurge": 1}}).rollout.max_surge == 1
    with pytest.raises(InvalidSpecError, match="ReadWriteOncePod"):
        parse_spec(
            {
                "model": {"id": "x"},
                "rollout": {"maxSurge": 1},
                "modelCache": {"accessModes": ["ReadWriteOncePod"]},
            }
        )


@pytest.mark.parametrize(
    "url",
    [
        "file:///data/images",  # the read-only root filesystem
        "file:///models",  # the cache's root, not a directory under it
        "file:///tmp/../etc/images",
        "file://tmp/images",  # host "tmp", path /images
    ],
)
def test_file_storage_outside_the_writable_mounts_is_invalid(url: str) -> None:
    """The worker's root filesystem is read-only; only /models and /tmp are writable mounts, so
    anywhere else every url request would fail with 500."""
    with pytest.raises(InvalidSpecError, match="under /models/, /tmp/"):
        parse_spec({"model": {"id": "x"}, "storage": {"url": url}})


@pytest.mark.parametrize("url", ["file:///tmp/images", "file:///models/images", "s3://bucket/images"])
def test_file_storage_in_a_writable_mount_or_object_storage_is_valid(url: str) -> None:
    spec = parse_spec({"model": {"id": "x"}, "storage": {"url": url}})
    assert spec.storage is not None and spec.storage.url == url


def test_startup_timeout_defaults_to_45_minutes() -> None:
    assert parse_spec({"model": {"id": "x"}}).rollout.startup_timeout_seconds == 45 * 60
    custom = parse_spec({"model": {"id": "x"}, "rollout": {"startupTimeoutSeconds": 7200}})
    assert custom.rollout.startup_timeout_seconds == 7200
