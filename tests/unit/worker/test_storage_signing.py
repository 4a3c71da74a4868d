"""Presigned URLs (S3 SigV4 in the bucket's region, GCS without a key file) and the start-up check.

S3 URLs are signed offline by the real botocore with made-up keys (signing needs no server); the
real S3 server's side is in tests/integration/worker/test_storage_backends.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from diffusion_worker.settings import settings_from_args
from diffusion_worker.storage import ImageStore, StorageError, check_at_start, gcs_signed_url

KEY = "users/a/generations/r/0.png"
AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Made-up keys and no region or endpoint from the machine running the tests."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "made-up")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    return monkeypatch


def presigned(storage_url: str, **options: Any) -> tuple[str, dict[str, list[str]]]:
    store = ImageStore(storage_url, public_base_url=None, url_expiry_seconds=600, **options)
    url = store.url_for(KEY, "http://worker/")
    store.close()
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}", parse_qs(parsed.query)


@pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_s3_urls_are_sigv4_for_the_region_on_its_regional_host(
    aws: pytest.MonkeyPatch, variable: str
) -> None:
    """botocore alone read only AWS_DEFAULT_REGION, and presigned SigV2 for us-east-1 on the global
    host: refused by every region opened since 2014 and every bucket made since mid-2020."""
    aws.setenv(variable, "eu-central-1")
    where, query = presigned("s3://images/out")
    assert where == f"https://images.s3.eu-central-1.amazonaws.com/out/{KEY}"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].split("/")[2:4] == ["eu-central-1", "s3"]
    assert query["X-Amz-Expires"] == ["600"]
    assert "Signature" not in query and "AWSAccessKeyId" not in query


def test_a_dotted_bucket_stays_path_style(aws: pytest.MonkeyPatch) -> None:
    """A virtual host `my.bucket.s3...` would not match S3's TLS certificate."""
    aws.setenv("AWS_REGION", "eu-west-1")
    where, query = presigned("s3://my.bucket/out")
    assert urlparse(where).netloc != "my.bucket.s3.eu-west-1.amazonaws.com"
    assert urlparse(where).path.startswith("/my.bucket/out/")
    assert query["X-Amz-Credential"][0].split("/")[2] == "eu-west-1"


def test_a_custom_endpoint_is_signed_sigv4_path_style(aws: pytest.MonkeyPatch) -> None:
    aws.setenv("AWS_ENDPOINT_URL", "http://minio.storage.svc:9000")
    aws.setenv("AWS_REGION", "us-east-1")
    where, query = presigned("s3://images/out")
    assert where == f"http://minio.storage.svc:9000/images/out/{KEY}"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


def test_the_presign_endpoint_names_the_host_clients_reach(aws: pytest.MonkeyPatch) -> None:
    aws.setenv("AWS_ENDPOINT_URL", "http://minio.storage.svc:9000")
    where, query = presigned("s3://images/out", presign_endpoint_url="https://s3.example.com")
    assert where == f"https://s3.example.com/images/out/{KEY}"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


def test_storage_settings_name_what_clients_could_not_fetch() -> None:
    assert settings_from_args(["--storage-url", "S3://Bucket/out/"]).storage_url == "s3://Bucket/out"
    with pytest.raises(ValueError, match="--public-base-url"):
        settings_from_args(["--storage-url", "memory://images"])
    mapped = ["--storage-url", "az://images", "--public-base-url", "https://cdn.example.com"]
    assert settings_from_args(mapped).public_base_url == "https://cdn.example.com"
    with pytest.raises(ValueError, match="presign-endpoint-url is for s3:// storage"):
        settings_from_args(["--storage-url", "gs://images", "--presign-endpoint-url", "https://x"])


class Credentials:
    """Google credentials without a private key, as GKE Workload Identity's metadata-server ones are."""

    def __init__(self, email: str | None) -> None:
        self.service_account_email = email
        self.token = "access-token"
        self.valid = True


class SigningFs:
    """Records what gcsfs' `sign` would pass to google-cloud-storage (no GCS here)."""

    def __init__(self, credentials: object) -> None:
        self.credentials = type("GoogleCredentials", (), {"credentials": credentials})()
        self.calls: list[dict[str, Any]] = []

    def sign(self, path: str, expiration: int, **kwargs: Any) -> str:
        self.calls.append({"path": path, "expiration": expiration, **kwargs})
        return "https://storage.googleapis.com/signed"


def test_gcs_credentials_without_a_key_sign_through_their_service_account() -> None:
    """google-auth refuses to sign with token-only credentials ("you need a private key"); the
    IAM Credentials API signs for the service account they name. A stand-in filesystem records the
    call: GCS cannot be reached from here."""
    fs = SigningFs(Credentials("worker@project.iam.gserviceaccount.com"))
    assert gcs_signed_url(fs, "bucket/key.png", 600) == "https://storage.googleapis.com/signed"
    assert fs.calls == [
        {
            "path": "bucket/key.png",
            "expiration": 600,
            "version": "v4",
            "service_account_email": "worker@project.iam.gserviceaccount.com",
            "access_token": "access-token",
        }
    ]


def test_gcs_user_credentials_cannot_sign_and_say_what_to_do() -> None:
    with pytest.raises(StorageError, match=r"name no service account.*--public-base-url"):
        gcs_signed_url(SigningFs(Credentials(None)), "bucket/key.png", 600)


def test_gcs_key_file_credentials_sign_themselves() -> None:
    from google.oauth2 import service_account

    key = service_account.Credentials.__new__(service_account.Credentials)
    key._signer = object()  # what from_service_account_file sets from the key file
    fs = SigningFs(key)
    gcs_signed_url(fs, "bucket/key.png", 60)
    assert fs.calls == [{"path": "bucket/key.png", "expiration": 60, "version": "v4"}]


def make_store(url: str) -> Any:
    return lambda: ImageStore(url, public_base_url=None, url_expiry_seconds=60)


def test_the_start_up_check_writes_presigns_and_leaves_nothing(tmp_path: Path) -> None:
    assert check_at_start(make_store(f"file://{tmp_path}/images"), timeout=30) is None
    assert list((tmp_path / "images").rglob("*")) == []


def test_a_store_the_worker_cannot_write_stops_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("where the storage folder should be")
    problem = check_at_start(make_store(f"file://{tmp_path}/a-file/images"), timeout=30)
    assert problem is not None and "could not store images under" in problem


def test_a_store_out_of_reach_now_is_only_a_warning(
    aws: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on port 9 here: the store may be back by the first request."""
    aws.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    aws.setenv("AWS_MAX_ATTEMPTS", "1")
    with caplog.at_level(logging.WARNING, logger="diffusion_worker.storage"):
        assert check_at_start(make_store("s3://images/out"), timeout=20) is None
    assert any("serving anyway" in record.getMessage() for record in caplog.records)
