"""Writes images through fsspec under --storage-url and says where clients can fetch them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diffusion_worker.fs_options import open_url
from diffusion_worker.logs import describe_error, in_pool_with_request_id

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
MAX_USER_LENGTH = 64
USER_HASH_LENGTH = 12  # hex digits of sha256 that tell apart ids sanitised to the same text
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
GCS_PROTOCOLS = {"gs", "gcs"}
PRESIGNING_PROTOCOLS = {"s3", "s3a", *GCS_PROTOCOLS}
# Requests whose images are written at once; more wait for a thread (their wait counts towards
# --storage-timeout). Its own pool: a black-holed endpoint holds these threads, never encoding's.
UPLOAD_THREADS = 8
# How often expired images are looked for, at most (and at least every url_expiry_seconds / 4).
EXPIRY_SWEEP_SECONDS = 300.0
# Seconds before each retry of a write that failed transiently (see _transient), while the request
# still waits: --storage-timeout bounds them, since a request that gives up abandons the upload.
# A lost write is costly (the 502 tells clients not to retry, and the images are gone).
WRITE_RETRY_DELAYS = (0.25, 1.0)
# Their libraries retry each request themselves (botocore and s3fs, gcsfs): not retried again.
SELF_RETRYING_PROTOCOLS = {"s3", "s3a", *GCS_PROTOCOLS}
# OSErrors that may pass (an NFS server restarting, a busy file); a full disk or a missing
# permission does not, and is not retried.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT}
StoreItem = tuple[str, bytes, str]  # key below the storage root, data, content type


class StorageError(Exception):
    """Images could not be stored; nothing of the request is left behind. The message names the
    storage URL and quotes the backend's error: it is for the worker log, not for clients."""


class UploadAbandonedError(Exception):
    """The request stopped waiting for this upload (timeout, client gone)."""


class Upload:
    """One request's upload, which the request may give up on while a thread still runs it.

    Whichever of `finish` (the thread, all written and signed) and `abandon` (the request) comes
    first wins, so the images are either handed to the request or removed by the thread: never
    both, never neither.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        """Whether the request gave up on this upload."""
        return self._abandoned

    def finish(self) -> bool:
        """Hand the upload to the request; False when the request had already given up."""
        with self._lock:
            self._finished = not self._abandoned
            return self._finished

    def abandon(self) -> bool:
        """Give up on the upload; False when it had already finished (its URLs stand)."""
        with self._lock:
            self._abandoned = not self._finished
            return self._abandoned


def _mtime(path: Path) -> float:
    """Modification time of `path` itself (a link's own, not its target's); +inf once it is gone."""
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


# Errors of a store that is down or out of reach now (it may be back by the first request), by
# class name: botocore's and aiohttp's are not ConnectionErrors.
UNREACHABLE_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError", "TransportError",
}  # fmt: skip


def _unreachable(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionError | TimeoutError) or type(exc).__name__ in UNREACHABLE_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed if tried again soon."""
    return _unreachable(exc) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


def check_at_start(make_store: Callable[[], ImageStore], timeout: float) -> str | None:
    """Why the worker cannot store images, or None. A store it cannot set up or may not write
    (unknown scheme, no credentials, a wrong key, no such bucket) is a reason not to start; one
    out of reach now, or not answering within `timeout`, is only logged: it may be back by the
    first request, and b64_json requests never need it."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            store = make_store()
            try:
                store.check()
            finally:
                store.close()
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        else:
            outcome.append(None)

    # A daemon thread: a black-holed endpoint must not hold the process at exit.
    checker = threading.Thread(target=attempt, name="storage-check", daemon=True)
    checker.start()
    checker.join(timeout)
    if not outcome:
        log.warning("storage did not answer a write check within %.0f s; serving anyway", timeout)
        return None
    error = outcome[0]
    if error is None:
        return None
    if _unreachable(error):
        log.warning("storage is out of reach now (%s); serving anyway", describe_error(error))
        return None
    return str(error) if isinstance(error, StorageError) else describe_error(error)


def gcs_signed_url(fs: Any, path: str, expiration: int) -> str:
    """A V4 signed URL for a gs:// object. Credentials with a private key (a service account key
    file) sign locally. Those without one, GKE Workload Identity's and other metadata-server or
    impersonated credentials, sign through the IAM Credentials API as their service account (it
    needs roles/iam.serviceAccountTokenCreator on itself). User credentials (gcloud auth
    application-default login) name no service account and cannot sign: the error says so."""
    credentials = fs.credentials.credentials
    if hasattr(credentials, "sign_bytes") and getattr(credentials, "signer", None) is not None:
        return str(fs.sign(path, expiration=expiration, version="v4"))
    import google.auth.transport.requests

    if not credentials.valid:
        credentials.refresh(google.auth.transport.requests.Request())
    email = getattr(credentials, "service_account_email", None)
    if not email or email == "default":
        raise StorageError(
            f"the Google credentials in use ({type(credentials).__name__}) name no service account, so "
            "they cannot sign URLs: use a service account (workload identity or a key file), or set "
            "--public-base-url"
        )
    signed = fs.sign(
        path, expiration=expiration, version="v4", service_account_email=email, access_token=credentials.token
    )
    return str(signed)


def sanitize_user(user: str | None) -> str:
    """A single safe path segment for `user`: no separators, no dot-only names, bounded length.

    A safe id is its own folder. Any other ends with a hash of the whole id, so two ids that
    sanitise alike (`alice@example.com`, `alice_example.com`; ids equal in their first 64
    characters) never share a folder, and with it deletion, lifecycle rules or ACLs."""
    if not user:
        return ANONYMOUS
    segment = _UNSAFE.sub("_", user).strip(".")
    if segment == user and len(segment) <= MAX_USER_LENGTH:
        return segment
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:USER_HASH_LENGTH]
    if not segment:
        return digest
    return f"{segment[: MAX_USER_LENGTH - USER_HASH_LENGTH - 1]}-{digest}"


def image_key(user: str | None, request_id: str, index: int, extension: str) -> str:
    """Path of one image below the storage root."""
    return f"users/{sanitize_user(user)}/generations/{request_id}/{index}.{extension}"


class ImageStore:
    """fsspec storage for generated images."""

    def __init__(
        self,
        storage_url: str,
        *,
        public_base_url: str | None,
        url_expiry_seconds: int,
        remove_expired: bool = False,
        presign_endpoint_url: str | None = None,
    ) -> None:
        """`remove_expired`: the files are the worker's own (its default local storage), so each is
        removed once its URL has expired (`expire_periodically`) and the disk does not fill up.
        `presign_endpoint_url`: the S3 endpoint clients reach, when the worker writes through
        another (an in-cluster MinIO's Service); presigned URLs are signed for that host."""
        self.storage_url = storage_url
        # Filesystems of its own: one cached earlier in the process may hold another endpoint.
        self.fs, self.root = open_url(storage_url, skip_instance_cache=True)
        self.root = self.root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._presign_fs: Any = None
        if presign_endpoint_url:
            self._presign_fs, _ = open_url(
                storage_url, endpoint_url=presign_endpoint_url, skip_instance_cache=True
            )
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.url_expiry_seconds = url_expiry_seconds
        self.removes_expired = remove_expired and self.serves_files
        self._uploads = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload")

    @property
    def is_local(self) -> bool:
        """Whether images land on this machine's file system."""
        return self.protocol in ("file", "local")

    @property
    def serves_files(self) -> bool:
        """Whether the worker must serve stored images itself (`GET /v1/images/files/...`)."""
        return self.is_local and self.public_base_url is None

    async def publish(self, items: list[StoreItem], request_base_url: str) -> list[str]:
        """Write every item and return its URL, on the upload threads; StorageError on any failure.

        Cancelled (a timeout around it, a client gone), it gives the upload up: one still waiting
        for a thread never starts, and the thread running one removes what it wrote once its
        current write returns. Either way nothing of the request stays in storage."""
        upload = Upload()
        try:
            return await in_pool_with_request_id(
                self._uploads, self.write_and_sign, items, request_base_url, upload
            )
        except asyncio.CancelledError:
            if not upload.abandon():  # it had just finished: its URLs will reach nobody
                self._uploads.submit(self._remove, [self._path(key) for key, _, _ in items])
            raise

    def write_and_sign(
        self, items: list[StoreItem], request_base_url: str, upload: Upload | None = None
    ) -> list[str]:
        """Write every (key, data, content_type) and return the URLs (blocking). On any failure,
        presigning included, or once `upload` is abandoned, remove what was written and raise."""
        written: list[str] = []
        try:
            for key, data, content_type in items:
                # Listed before the write: one that fails part-way (a full disk) leaves a truncated
                # file, which the worker would otherwise go on serving.
                written.append(self._path(key))
                self._write_retrying(key, data, content_type, upload)
                if upload is not None and upload.abandoned:
                    raise UploadAbandonedError("the request stopped waiting")
            urls = [self.url_for(key, request_base_url) for key, _, _ in items]
            if upload is not None and not upload.finish():
                raise UploadAbandonedError("the request stopped waiting")
            return urls
        except StorageError:
            self._remove(written)
            raise
        except Exception as exc:
            self._remove(written)
            raise StorageError(
                f"could not store images under {self.storage_url}: {describe_error(exc)}"
            ) from exc

    def close(self) -> None:
        """Stop the upload threads; queued uploads are dropped, running ones finish (or are removed)."""
        self._uploads.shutdown(wait=False, cancel_futures=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _write_retrying(self, key: str, data: bytes, content_type: str, upload: Upload | None) -> None:
        """`_write`, tried again after each of WRITE_RETRY_DELAYS while it fails transiently and the
        request still waits for it (a retried write overwrites what the failed one left)."""
        delays = () if self.protocol in SELF_RETRYING_PROTOCOLS else WRITE_RETRY_DELAYS
        for retry, delay in enumerate(delays, start=1):
            try:
                self._write(key, data, content_type)
                return
            except Exception as exc:
                if not _transient(exc) or (upload is not None and upload.abandoned):
                    raise
                log.warning(  # the file name only: the key's folder names the user
                    "write of image %s failed (%s); retry %d of %d in %.2f s",
                    key.rsplit("/", 1)[-1],
                    describe_error(exc),
                    retry,
                    len(delays),
                    delay,
                )
            time.sleep(delay)
            if upload is not None and upload.abandoned:
                raise UploadAbandonedError("the request stopped waiting")
        self._write(key, data, content_type)

    def _write(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        if self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data, **self._content_type_options(content_type))

    def _remove(self, paths: list[str]) -> None:
        """Remove what a failed upload wrote (a path it never reached is no error) and, on local
        storage, its request's folder, which held nothing else (request ids are unique)."""
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("could not remove %s after a failed upload: %s", path, describe_error(exc))
        if self.is_local:
            for folder in {path.rsplit("/", 1)[0] for path in paths}:
                with contextlib.suppress(OSError):  # never made, or not empty
                    Path(folder).rmdir()

    def _content_type_options(self, content_type: str) -> dict[str, Any]:
        if self.protocol in ("s3", "s3a"):
            return {"ContentType": content_type}
        if self.protocol in ("gs", "gcs"):
            return {"content_type": content_type}
        return {}

    def url_for(self, key: str, request_base_url: str) -> str:
        """Public base URL + key; else a presigned URL (s3/gs); else the worker's own files route."""
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        if self.protocol in PRESIGNING_PROTOCOLS:
            try:
                return self._presign(self._path(key))
            except Exception as exc:
                raise StorageError(
                    f"could not presign a URL under {self.storage_url}: {describe_error(exc)}"
                ) from exc
        if self.serves_files:
            return f"{request_base_url.rstrip('/')}/v1/images/files/{key}"
        return f"{self.storage_url}/{key}"

    def _presign(self, path: str) -> str:
        signer = self._presign_fs or self.fs
        if self.protocol in GCS_PROTOCOLS:
            return gcs_signed_url(signer, path, self.url_expiry_seconds)
        return str(signer.sign(path, expiration=self.url_expiry_seconds))

    def check(self) -> None:
        """Write, presign and remove a small object, as a request's upload would; StorageError if
        any of it fails. Run at start-up, so wrong credentials or a bucket the worker may not write
        stop the worker before it loads a model, instead of failing every url request after its
        images were made."""
        key = f".write-check/{uuid.uuid4().hex}"
        self.write_and_sign([(key, b"image-diffusion-operator write check\n", "text/plain")], "http://check/")
        self._remove([self._path(key)])

    def local_file(self, key: str) -> Path | None:
        """The regular file for `key` inside the storage root; None for traversal or links out."""
        if not self.is_local:
            return None
        root = Path(os.path.realpath(self.root))
        candidate = Path(os.path.realpath(root / key))
        if not candidate.is_relative_to(root) or candidate == root or not candidate.is_file():
            return None
        if self.removes_expired and _mtime(candidate) < time.time() - self.url_expiry_seconds:
            return None  # its URL has expired; the next sweep removes it
        return candidate

    def remove_expired(self, now: float | None = None) -> int:
        """Remove stored images older than --url-expiry-seconds, and their request's folder once it
        is empty; returns how many were removed. Only with `removes_expired`; links are removed,
        never followed. The folders above a request's are left: an upload may be creating one."""
        if not self.removes_expired:
            return 0
        cutoff = (time.time() if now is None else now) - self.url_expiry_seconds
        root = Path(self.root)
        removed = 0
        for folder, _, names in os.walk(root):
            current = Path(folder)
            parts = current.relative_to(root).parts
            # users/{user}/generations/{request_id}, written before the cutoff: no upload adds to it
            # any more (request ids are unique), so it can go once empty. A newer one may be an
            # upload's, made a moment before its first file.
            old_request_folder = len(parts) == 4 and parts[0] == "users" and _mtime(current) < cutoff
            for name in names:
                path = current / name
                if _mtime(path) < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
            if old_request_folder:
                with contextlib.suppress(OSError):  # not empty: a file in it is not old yet
                    current.rmdir()
        return removed

    async def expire_periodically(self, on_removed: Callable[[int], None]) -> None:
        """Run `remove_expired` now and then every min(EXPIRY_SWEEP_SECONDS, expiry / 4) seconds,
        off the event loop, until cancelled; `on_removed(count)` after each sweep that removed any.
        Returns at once without `removes_expired`."""
        if not self.removes_expired:
            return
        interval = min(EXPIRY_SWEEP_SECONDS, max(1.0, self.url_expiry_seconds / 4))
        while True:
            try:
                removed = await asyncio.to_thread(self.remove_expired)
            except Exception as exc:
                log.warning("could not remove expired images under %s: %s", self.root, describe_error(exc))
            else:
                if removed:
                    log.info("removed %d images whose URLs had expired", removed)
                    on_removed(removed)
            await asyncio.sleep(interval)
