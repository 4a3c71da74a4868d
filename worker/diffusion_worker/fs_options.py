"""fsspec filesystems for storage URLs, with the options each protocol needs to sign URLs that work."""

from __future__ import annotations

import os
from typing import Any

S3_PROTOCOLS = ("s3", "s3a")
# Where botocore reads a custom S3 endpoint from, the one it prefers first.
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_region() -> str | None:
    """The region from AWS_REGION (what the AWS SDKs, the docs and the samples name) or
    AWS_DEFAULT_REGION (the only one botocore itself reads)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_endpoint() -> str | None:
    """A custom S3 endpoint (MinIO, SeaweedFS, R2, GCS's XML API), as botocore reads it."""
    return next((os.environ[name] for name in S3_ENDPOINT_VARIABLES if os.environ.get(name)), None)


def storage_options(url: str, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for `url`. For S3: Signature Version 4 in the configured region.

    Left to botocore, a presigned URL is SigV2 for the default region us-east-1 whatever
    AWS_REGION says: every region opened since 2014 and every bucket created since mid-2020 refuse
    it, as do SSE-KMS objects and most S3-compatible stores. On AWS itself (no custom endpoint) a
    bucket is addressed by its regional host, `BUCKET.s3.REGION.amazonaws.com`, which a SigV4
    signature for that region is valid at; a bucket name with a dot stays path-style, as a
    virtual host would not match the TLS certificate. `endpoint_url` overrides the endpoint (the
    host presigned URLs are made for).
    """
    protocol = url.split("://", 1)[0].lower()
    if protocol not in S3_PROTOCOLS:
        return {}
    config: dict[str, Any] = {"signature_version": "s3v4"}
    client: dict[str, Any] = {}
    region = s3_region()
    if region:
        client["region_name"] = region
    if endpoint_url:
        client["endpoint_url"] = endpoint_url
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if region and not (endpoint_url or s3_endpoint()) and "." not in bucket:
        config["s3"] = {"addressing_style": "virtual"}
    return {"config_kwargs": config, "client_kwargs": client}


def open_url(url: str, *, endpoint_url: str | None = None, **options: Any) -> tuple[Any, str]:
    """(filesystem, path) for `url` through fsspec, with `storage_options`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url=endpoint_url), **options)
    return fs, str(path)
