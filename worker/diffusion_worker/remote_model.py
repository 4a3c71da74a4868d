"""A `--model` in object storage (`s3://`, `gs://`): its folder in the cache dir, and the copy there,
checked against the store at every start.

The store is listed once per start. A copy holds a manifest (MANIFEST) of what it was copied from:
each file's size and ETag. While the listing matches it the copy is used as it is; where it does
not, what changed is fetched again. A copy is written in one staging folder per model, a file at a
time (under a temporary name, renamed when whole, then recorded in the staging folder's manifest),
so a start stopped part way is carried on by the next; once every file is there and on disk the
staging folder is renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fsspec import callbacks as fsspec_callbacks

from diffusion_worker.fs_options import S3_ENDPOINT_VARIABLES, open_url
from diffusion_worker.model_source import (
    ModelSourceError,
    abandoned,
    cache_lock,
    fsync_path,
    is_staging_name,
    staging_name,
    staging_suffix,
    sync_tree,
)

log = logging.getLogger(__name__)

# In the copy's folder; never taken from the store (a copy uploaded back would bring one along).
MANIFEST = ".diffusion-worker-copy.json"
MODEL_INDEX = "model_index.json"
# How often a model copy logs its progress, at most.
PROGRESS_LOG_SECONDS = 30.0
# Rounds of filling the staging folder when other processes take it first (see `_write_copy`).
PUT_IN_PLACE_ATTEMPTS = 3
# How long to wait, at most, for another process that has taken the staging folder to put it in
# place (it checks, syncs and renames: seconds), and how often to look.
TAKEN_WAIT_SECONDS = 60.0
TAKEN_POLL_SECONDS = 0.1
# Of the URI, in the copy's folder name; a hash tells URIs apart, this is for people to read.
READABLE_NAME_CHARACTERS = 80
# Where each scheme's client reads its endpoint from, the one it prefers first: the same URI on
# another endpoint (MinIO, a GCS emulator) is another model.
ENDPOINT_VARIABLES = {
    "s3": S3_ENDPOINT_VARIABLES,
    "gs": ("STORAGE_EMULATOR_HOST",),
    "gcs": ("STORAGE_EMULATOR_HOST",),
}
CREDENTIALS_HINTS = {
    "s3": "credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, "
    "AWS_REGION",
    "gs": "credentials come from GOOGLE_APPLICATION_CREDENTIALS, else the node's service account",
}
# Errors writing the cache dir, not reading the store: reported as the cache dir's (by the engine).
LOCAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass(frozen=True)
class FileVersion:
    """What the store says of one file; a copied file is current while this is unchanged."""

    size: int
    etag: str | None


@dataclass(frozen=True)
class RemoteModel:
    """A model folder in object storage as listed at this start; `files` by path under `root`."""

    uri: str
    fs: Any
    root: str
    files: dict[str, FileVersion]


def cache_folder(uri: str) -> str:
    """The copy's folder under `remote/`: the URI made safe for a file name and cut short, then a hash
    of the URI and its endpoint, so URIs that read alike (`a/b`, `a_b`) never share a copy."""
    scheme = uri.split("://", 1)[0]
    variables = ENDPOINT_VARIABLES.get(scheme, ())
    endpoint = next((os.environ[name] for name in variables if os.environ.get(name)), "")
    digest = hashlib.sha256(f"{uri}\n{endpoint}".encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', uri)[:READABLE_NAME_CHARACTERS]}-{digest}"


def copy_remote_model(uri: str, cache_dir: Path) -> Path:
    """A copy of the model at `uri` in `cache_dir`, brought up to date with the store. Where the store
    cannot be listed, or the update cannot be finished (an upload under way), a copy made before is
    used as it is, with a warning: it is whole, if perhaps out of date."""
    directory = cache_dir / "remote" / cache_folder(uri)
    try:
        _bring_up_to_date(uri, directory)
    except ModelSourceError as exc:
        if _read_manifest(directory) is None:
            raise
        log.warning("%s; using the copy at %s as it was last fetched", exc, directory)
    return directory


def _bring_up_to_date(uri: str, directory: Path) -> None:
    model = _list_model(uri)
    if _read_manifest(directory) == model.files:
        log.info("using cached copy of %s at %s", uri, directory)
        return
    _mention_older_copy(uri, directory.parent)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(directory, uri) as locked:
        copied = _read_manifest(directory)
        if copied == model.files:
            log.info("%s: another process put it at %s", uri, directory)
            return
        if copied is not None:
            log.info("%s differs from its copy at %s: fetching what changed", uri, directory)
        log.info("writing %s to %s", uri, directory)
        _write_copy(model, directory, locked)


def _list_model(uri: str) -> RemoteModel:
    """Every file under `uri`, listed once; ModelSourceError naming the URI, the cause and where the
    credentials come from when it cannot be listed, or when it holds no pipeline."""
    try:
        # A filesystem of its own: one cached earlier in the process may hold another endpoint.
        fs, root = open_url(uri, skip_instance_cache=True)
        root = root.rstrip("/")
        found = fs.find(root, detail=True)
    except Exception as exc:  # botocore's and google-auth's errors are not OSErrors
        raise _store_error(uri, "cannot list it", exc) from exc
    files = {
        path.removeprefix(f"{root}/"): FileVersion(int(info.get("size") or 0), _etag(info))
        for path, info in found.items()
        if info.get("type") == "file" and path.startswith(f"{root}/") and path != f"{root}/{MANIFEST}"
    }
    if MODEL_INDEX not in files:
        raise ModelSourceError(f"--model {uri!r}: no diffusers pipeline there ({MODEL_INDEX} not found)")
    return RemoteModel(uri, fs, root, files)


def _etag(info: dict[str, Any]) -> str | None:
    etag = info.get("ETag") or info.get("etag")  # s3fs, gcsfs
    return str(etag) if etag else None


def _store_error(uri: str, doing: str, exc: BaseException) -> ModelSourceError:
    hint = CREDENTIALS_HINTS["s3" if uri.startswith("s3://") else "gs"]
    return ModelSourceError(f"--model {uri!r}: {doing}: {type(exc).__name__}: {exc} ({hint})")


def _read_manifest(folder: Path) -> dict[str, FileVersion] | None:
    """The files a copy (or a staging folder) records as copied; None without a readable manifest."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
        return {name: FileVersion(**version) for name, version in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(folder: Path, uri: str, files: dict[str, FileVersion]) -> None:
    target = folder / MANIFEST
    partial = target.with_name(staging_name(target.name))
    recorded = {name: asdict(version) for name, version in sorted(files.items())}
    partial.write_text(json.dumps({"uri": uri, "files": recorded}, indent=1))
    fsync_path(partial)
    partial.replace(target)


def _mention_older_copy(uri: str, remote: Path) -> None:
    """Copies made before folder names carried a hash are not used (two URIs could share one). Say
    so, but leave them: a worker of the older version may still load from one."""
    older = remote / re.sub(r"[^A-Za-z0-9._-]+", "_", uri)
    try:
        found = (older / MODEL_INDEX).is_file()
    except OSError:  # a name too long to have been made
        return
    if found:
        log.info(
            "%s, copied by an older worker version, is no longer used: delete it to free its space", older
        )


class _StagingTaken(ModelSourceError):
    """Another process took the staging folder to put it in place, or wrote to it as it was taken
    (see `_write_copy`)."""


def _write_copy(model: RemoteModel, directory: Path, locked: bool) -> None:
    """Fill the model's staging folder and put it in place. Where locks do not exclude every process
    (refused, or per node on NFS) several may fill it at once: the first to finish takes it, and the
    others wait for that copy to be in place (and use it), or carry on with the staging folder where
    the taker could not finish."""
    staging = directory.with_name(f".{directory.name}.partial")
    for left in directory.parent.glob(f".{directory.name}.*"):  # taken or retired by a process now gone
        if left.is_dir() and abandoned(left, locked):
            shutil.rmtree(left, ignore_errors=True)
    for attempt in range(1, PUT_IN_PLACE_ATTEMPTS + 1):
        if _put_there_by_another(model, directory, locked):
            return
        try:
            _fill_staging(model, staging, directory, locked)
            _put_in_place(model, staging, directory)
            return
        except Exception as exc:
            if attempt == PUT_IN_PLACE_ATTEMPTS or not _taken(exc, staging):
                if _put_there_by_another(model, directory, locked, wait=False):
                    return
                raise
            log.info("%s: another process took %s to put it in place", model.uri, staging)


def _put_there_by_another(model: RemoteModel, directory: Path, locked: bool, wait: bool = True) -> bool:
    """Whether another process has put the copy the store lists in `directory`; with `wait`, first
    waiting (TAKEN_WAIT_SECONDS at most) while one that has taken the staging folder is at it."""
    deadline = time.monotonic() + (TAKEN_WAIT_SECONDS if wait else 0.0)
    while _read_manifest(directory) != model.files:
        if time.monotonic() >= deadline or not _being_put_in_place(directory, locked):
            return False
        time.sleep(TAKEN_POLL_SECONDS)
    log.info("%s: another process put it at %s first", model.uri, directory)
    for ours in directory.rglob(f"*{staging_suffix()}"):  # renamed in along with its folder
        ours.unlink(missing_ok=True)
    return True


def _being_put_in_place(directory: Path, locked: bool) -> bool:
    """Whether a process is putting a copy in place: a staging folder it has taken (see
    `_put_in_place`) is there, its writer not known to be gone."""
    return any(
        taken.is_dir() and not abandoned(taken, locked)
        for taken in directory.parent.glob(f".{directory.name}.partial-*")
    )


def _taken(exc: Exception, staging: Path) -> bool:
    """Whether `exc` says the staging folder went from under us: taken, or renamed mid-write."""
    if isinstance(exc, _StagingTaken) or not staging.is_dir():
        return True
    return isinstance(exc, OSError) and str(exc.filename or "").startswith(str(staging))


def _folder_for(staging: Path, name: str) -> Path:
    """The folder of file `name` in `staging`, made where missing; `staging` itself is never made
    here: one another process has taken must not come back half empty (an OSError instead)."""
    folder = staging
    for part in Path(name).parent.parts:
        folder = folder / part
        folder.mkdir(exist_ok=True)
    return folder


def _fill_staging(model: RemoteModel, staging: Path, directory: Path, locked: bool) -> None:
    """Fetch into `staging` what it lacks: files it holds from an interrupted copy, or unchanged in the
    copy being replaced, are kept; model_index.json comes first, to refuse a half-uploaded model."""
    staging.mkdir(exist_ok=True)
    done = _resumable_files(model, staging, locked)
    done |= _link_unchanged(model, directory, staging, done)
    missing = sorted(set(model.files) - set(done), key=lambda name: (name != MODEL_INDEX, name))
    progress = _CopyProgress(model.uri, [model.files[name].size for name in missing], len(done))
    for name in missing:
        if not staging.is_dir() or _read_manifest(directory) == model.files:
            raise _StagingTaken(f"--model {model.uri!r}: {staging} was taken by another process")
        _fetch_file(model, name, staging, progress)
        done[name] = model.files[name]
        _write_manifest(staging, model.uri, done)
        if name == MODEL_INDEX:
            _check_components(model, staging / MODEL_INDEX)
    if MODEL_INDEX not in missing:
        _check_components(model, staging / MODEL_INDEX)
    progress.finished()


def _resumable_files(model: RemoteModel, staging: Path, locked: bool) -> dict[str, FileVersion]:
    """The files in `staging` that are whole and current: recorded at the version the store lists,
    and of its size. Temporary files of writers that are gone, and files the store no longer has,
    are removed; a temporary file another node may be writing is left alone."""
    recorded = _read_manifest(staging) or {}
    kept: dict[str, FileVersion] = {}
    for path in sorted(staging.rglob("*")):
        name = path.relative_to(staging).as_posix()
        if not path.is_file() or name == MANIFEST:
            continue
        if is_staging_name(path.name):
            if abandoned(path, locked):
                path.unlink(missing_ok=True)
            continue
        version = model.files.get(name)
        if version is None:
            path.unlink(missing_ok=True)
        elif recorded.get(name) == version and _has_size(path, version.size):
            kept[name] = version
    return kept


def _link_unchanged(
    model: RemoteModel, directory: Path, staging: Path, done: dict[str, FileVersion]
) -> dict[str, FileVersion]:
    """Files of the copy being replaced that the store has not changed, hard-linked into `staging`
    (copied where the filesystem has no hard links) instead of fetched again."""
    copied = _read_manifest(directory) or {}
    linked: dict[str, FileVersion] = {}
    for name, version in sorted(model.files.items()):
        source = directory / name
        if name in done or copied.get(name) != version or not _has_size(source, version.size):
            continue
        target = _folder_for(staging, name) / Path(name).name
        partial = target.with_name(staging_name(target.name))
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:
            shutil.copyfile(source, partial)
        partial.replace(target)
        linked[name] = version
    if linked:
        _write_manifest(staging, model.uri, {**done, **linked})
    return linked


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _check_components(model: RemoteModel, index_file: Path) -> None:
    """ModelSourceError unless the store has a folder for every component model_index.json names (a
    [library, class] pair): uploads such as `aws s3 sync` put model_index.json there before the
    weights, and a copy taken then would lack them."""
    try:
        index = json.loads(index_file.read_text())
    except ValueError as exc:
        raise ModelSourceError(f"--model {model.uri!r}: {MODEL_INDEX} is not JSON: {exc}") from exc
    folders = {name.split("/", 1)[0] for name in model.files if "/" in name}
    named = index.items() if isinstance(index, dict) else ()
    missing = sorted(name for name, value in named if _names_a_component(value) and name not in folders)
    if missing:
        raise ModelSourceError(
            f"--model {model.uri!r}: {MODEL_INDEX} names {', '.join(missing)} but there is no such "
            "folder there (is the upload still going on?)"
        )


def _names_a_component(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)


def _fetch_file(model: RemoteModel, name: str, staging: Path, progress: _CopyProgress) -> None:
    """Fetch one file under a temporary name and rename it when whole and on disk, so a file under
    its own name in `staging` is never half written."""
    target = _folder_for(staging, name) / Path(name).name
    partial = target.with_name(staging_name(target.name))
    try:
        model.fs.get_file(f"{model.root}/{name}", str(partial), callback=_FileBytes(progress))
        size = partial.stat().st_size
    except Exception as exc:
        partial.unlink(missing_ok=True)
        if _written_here(exc, staging):
            raise
        raise _store_error(model.uri, f"cannot fetch {name}", exc) from exc
    if size != model.files[name].size:
        partial.unlink()
        raise ModelSourceError(
            f"--model {model.uri!r}: {name} changed while it was copied (is an upload going on?); "
            "the next start carries on with the copy"
        )
    fsync_path(partial)
    partial.replace(target)


def _written_here(exc: Exception, staging: Path) -> bool:
    """Whether `exc` came from writing the cache dir (full, read-only, not ours) rather than the store."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in LOCAL_WRITE_ERRNOS or str(exc.filename or "").startswith(str(staging))


def _put_in_place(model: RemoteModel, staging: Path, directory: Path) -> None:
    """Take the finished staging folder (rename it to a name of this process's, so that nobody else
    writes to it), check that every file is there, sync it to disk and rename it over `directory`."""
    taken = directory.with_name(staging_name(directory.name))
    try:
        staging.rename(taken)
    except FileNotFoundError as exc:
        raise _StagingTaken(f"--model {model.uri!r}: {staging} was taken by another process") from exc
    try:
        for stray in taken.rglob(".*"):  # what other writers had under way when it was taken
            if stray.is_file() and is_staging_name(stray.name):
                stray.unlink(missing_ok=True)
        short = sorted(
            name for name, version in model.files.items() if not _has_size(taken / name, version.size)
        )
        if short:
            raise _StagingTaken(
                f"--model {model.uri!r}: {', '.join(short)} missing from the copy as it was finished "
                "(another process writing it?); the next start carries on with it"
            )
        _write_manifest(taken, model.uri, model.files)
        sync_tree(taken)
        _replace_copy(model, taken, directory)
    finally:
        if taken.exists():
            _give_back(taken, staging)


def _give_back(taken: Path, staging: Path) -> None:
    """A copy that was not put in place goes back to be carried on with, unless a new staging folder
    has been started meanwhile."""
    try:
        taken.rename(staging)
    except OSError:
        shutil.rmtree(taken, ignore_errors=True)


def _replace_copy(model: RemoteModel, taken: Path, directory: Path) -> None:
    """Rename the whole copy `taken` to `directory`, retiring the copy there unless another process
    has just put the same one there."""
    if _read_manifest(directory) == model.files:
        shutil.rmtree(taken, ignore_errors=True)
        return
    retired = directory.with_name(staging_name(f"{directory.name}.retired"))
    if directory.exists():
        directory.rename(retired)
    try:
        taken.rename(directory)
    except OSError:  # another process put its copy there since
        if _read_manifest(directory) != model.files:
            raise
        shutil.rmtree(taken, ignore_errors=True)
    finally:
        if retired.exists() and not directory.exists():
            retired.rename(directory)  # ours could not go there: the older copy is better than none
        shutil.rmtree(retired, ignore_errors=True)
    fsync_path(directory.parent)


def _amount(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


class _CopyProgress:
    """Logs a model copy as it goes, at most every PROGRESS_LOG_SECONDS (a big model takes minutes,
    and a silent log looks like a hang): the bytes copied, summed from each file's own callback."""

    def __init__(self, uri: str, sizes: list[int], already_here: int) -> None:
        self.uri = uri
        self.total_bytes = sum(sizes)
        self.bytes_done = 0
        self.started = self.logged_at = time.monotonic()
        kept = f" ({already_here} files already here)" if already_here else ""
        log.info("copying %s: %d files, %s%s", uri, len(sizes), _amount(self.total_bytes), kept)

    def log_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self.logged_at >= PROGRESS_LOG_SECONDS:
            self.logged_at = now
            log.info("copying %s: %s of %s", self.uri, _amount(self.bytes_done), _amount(self.total_bytes))

    def finished(self) -> None:
        log.info(
            "copied %s: %s in %.1f s", self.uri, _amount(self.bytes_done), time.monotonic() - self.started
        )


class _FileBytes(fsspec_callbacks.Callback):  # type: ignore[misc]  # fsspec is untyped
    """One file's bytes, added to its copy's total as they arrive."""

    def __init__(self, copy: _CopyProgress) -> None:
        super().__init__()
        self.copy = copy
        self.counted = 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.copy.bytes_done += self.value - self.counted
        self.counted = self.value
        self.copy.log_now_and_then()
