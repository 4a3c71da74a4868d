"""Where a `--model s3://...` or `gs://...` copy lives in the cache dir (the copy itself, against a
real S3 server, is tested in tests/integration/worker/test_model_cache.py)."""

from __future__ import annotations

import pytest

from diffusion_worker.remote_model import cache_folder


def test_the_folder_name_starts_with_the_uri_made_safe_for_a_file_name() -> None:
    assert cache_folder("s3://models/sdxl/v1").startswith("s3_models_sdxl_v1-")


def test_uris_that_read_alike_get_folders_of_their_own() -> None:
    """Both were `s3_models_sdxl_v1`: the second model served the first one's weights."""
    assert cache_folder("s3://models/sdxl/v1") != cache_folder("s3://models/sdxl_v1")


def test_the_same_uri_on_another_s3_endpoint_gets_a_folder_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """s3://models/sdxl on MinIO and on AWS are different models."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    on_aws = cache_folder("s3://models/sdxl")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    on_minio = cache_folder("s3://models/sdxl")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://ceph:7480")  # botocore prefers it
    on_ceph = cache_folder("s3://models/sdxl")
    assert len({on_aws, on_minio, on_ceph}) == 3


def test_a_long_uri_still_gives_a_name_the_filesystem_takes() -> None:
    """A name is at most 255 bytes, and the staging folder and lock file add to it."""
    name = cache_folder("s3://models/" + "/".join(letter * 100 for letter in "abcde"))
    assert len(f".{name}.partial".encode()) <= 255
    assert name.startswith("s3_models_aaaa")
