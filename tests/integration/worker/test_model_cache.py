"""The model cache: an `s3://` model is copied into it and served, checked against the store at each
start (what changed is fetched again, a copy cut short is resumed), and processes that share it
(replicas on one ReadWriteMany volume, context-parallel ranks) write each model once, whole.

Real parts: SeaweedFS as the S3 server (one of the test's own where it is stopped), separate worker
processes started together on one cache directory or killed part way, the real worker serving the
copied model to the official openai client.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import s3fs

from diffusion_worker import remote_model
from diffusion_worker.engine import DiffusersEngine, ModelLoadError
from diffusion_worker.model_source import ModelSourceError, resolve_model
from diffusion_worker.settings import WorkerSettings
from support.seaweedfs import S3Endpoint, SeaweedServer

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]

# Imports first, then waits for the go file, so every process asks for the model at the same moment.
RESOLVE_TOGETHER = """
import logging, sys, time
from pathlib import Path
from diffusion_worker.model_source import resolve_model
import diffusers, torch  # what loading the model would import anyway, before the start line

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
model, cache, go, ready, locks = sys.argv[1:6]
if locks == "per-node":  # as on NFS with local_lock=all, each process on a node of its own gets the lock
    import filelock, socket
    filelock.FileLock.acquire = lambda self, *args, **kwargs: self
    filelock.FileLock.release = lambda self, *args, **kwargs: None
    socket.gethostname = lambda: f"node-{Path(ready).name}"
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(resolve_model(model, Path(cache)).name_or_path)
"""


@pytest.fixture
def bucket(seaweedfs: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[s3fs.S3FileSystem, str]]:
    """An empty bucket and a client of it; the S3 endpoint and keys in the environment."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"models-{os.getpid()}-{time.monotonic_ns()}"
    fs.mkdir(name)
    yield fs, name
    fs.rm(name, recursive=True)


@pytest.fixture
def s3_model(bucket: tuple[s3fs.S3FileSystem, str], tiny_model_dir: Path) -> str:
    """The tiny pipeline uploaded to a bucket; the S3 endpoint and keys in the environment."""
    fs, name = bucket
    fs.put(f"{tiny_model_dir}/", f"{name}/tiny-sd/", recursive=True)
    return f"s3://{name}/tiny-sd"


def files_under(directory: Path) -> dict[str, bytes]:
    """Every file's bytes by relative path; the copy's manifest aside (the store has none)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file() and path.name != remote_model.MANIFEST
    }


def model_files(directory: Path) -> list[str]:
    return sorted(files_under(directory))


def resolve_together(
    model: str, cache: Path, processes: int, locks: str = "working"
) -> list[subprocess.CompletedProcess[str]]:
    """`resolve_model(model, cache)` in `processes` separate Python processes at the same moment;
    `locks="per-node"` grants each of them the cache lock, as NFS's local locks do on separate nodes."""
    go = cache.parent / "go"
    started = []
    for index in range(processes):
        ready = cache.parent / f"ready-{index}"
        command = [sys.executable, "-c", RESOLVE_TOGETHER, model, str(cache), str(go), str(ready), locks]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append((process, ready))
    deadline = time.monotonic() + 120
    while not all(ready.exists() for _, ready in started):
        assert time.monotonic() < deadline, "the processes never got ready"
        assert all(process.poll() is None for process, _ in started), "a process exited before the start"
        time.sleep(0.01)
    go.touch()
    results = []
    for process, _ in started:
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def cache_entries(directory: Path) -> list[str]:
    """What lies in a cache folder, lock files aside (they stay, empty, like any lock file)."""
    return sorted(path.name for path in directory.iterdir() if not path.name.endswith(".lock"))


def copy_name(uri: str) -> str:
    """The folder a copy of `uri` has under `remote/` (its naming is tested in test_remote_model.py)."""
    return remote_model.cache_folder(uri)


def writers(results: list[subprocess.CompletedProcess[str]]) -> int:
    return sum(bool(re.search(r"^diffusion_worker\.\w+ writing ", result.stderr, re.M)) for result in results)


def copy_logged(caplog: pytest.LogCaptureFixture, uri: str) -> tuple[int, int]:
    """(files fetched, files already there) from the copy's `copying URI: ...` line."""
    for record in caplog.records:
        found = re.fullmatch(
            rf"copying {re.escape(uri)}: (\d+) files, [\d.]+ [MG]iB(?: \((\d+) files already here\))?",
            record.getMessage(),
        )
        if found:
            return int(found[1]), int(found[2] or 0)
    raise AssertionError(f"no copy logged: {[record.getMessage() for record in caplog.records]}")


def upload(fs: s3fs.S3FileSystem, local: Path, remote: str, names: list[str]) -> None:
    """Upload files and folders of `local` to `remote`, in the order given (as a sync would)."""
    for name in names:
        if (local / name).is_dir():
            fs.put(f"{local / name}/", f"{remote}/{name}/", recursive=True)
        else:
            fs.put(str(local / name), f"{remote}/{name}")


def test_an_s3_model_is_copied_into_the_cache_and_served(
    start_worker: WorkerFactory, s3_model: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """README: `--model s3://...` is copied into the cache dir and loaded from there."""
    local_url = start_worker()
    url = start_worker(model=s3_model, cache_dir=tmp_path / "s3-cache")
    remote = tmp_path / "s3-cache" / "remote"
    assert cache_entries(remote) == [copy_name(s3_model)]
    assert files_under(remote / copy_name(s3_model)) == files_under(tiny_model_dir)
    body: dict[str, Any] = {"prompt": "a red circle", "size": "64x64", "response_format": "b64_json"}
    body["extra_body"] = {"nvext": {"seed": 5, "num_inference_steps": 2}}
    images = [
        openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0).images.generate(**body)
        for base in (url, local_url)
    ]
    pngs = [base64.b64decode((image.data or [])[0].b64_json or "") for image in images]
    assert pngs[0] == pngs[1], "the copy is the same model as the directory it was uploaded from"


def test_processes_starting_together_download_an_s3_model_once_and_whole(
    s3_model: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Before, each process removed the others' half-written copy and wrote its own into one shared
    staging directory; the first to finish renamed a mix of files into place."""
    cache = tmp_path / "cache"
    results = resolve_together(s3_model, cache, processes=3)
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    paths = {result.stdout.strip() for result in results}
    assert len(paths) == 1
    assert files_under(Path(paths.pop())) == files_under(tiny_model_dir)
    assert writers(results) == 1, [result.stderr for result in results]
    assert cache_entries(cache / "remote") == [copy_name(s3_model)], "no staging directory left behind"


def test_processes_starting_together_build_a_builtin_model_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    results = resolve_together("builtin:tiny-sd", cache, processes=2)
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    assert {result.stdout.strip() for result in results} == {str(cache / "builtin" / "tiny-sd")}
    assert writers(results) == 1, [result.stderr for result in results]
    assert cache_entries(cache / "builtin") == ["tiny-sd"], "no staging directory left behind"


def test_processes_whose_locks_do_not_exclude_each_other_still_each_get_a_whole_copy(
    s3_model: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """On NFS with per-node locks (nolock, local_lock=all) pods on two nodes both hold the lock.
    Before, each holder deleted every other staging folder, the other's copy in progress included;
    then the processes that lost the race to put it in place made a staging folder again, and left it
    (with as much as the whole model in it), or failed on one they had made half of."""
    cache = tmp_path / "cache"
    results = resolve_together(s3_model, cache, processes=3, locks="per-node")
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    assert {result.stdout.strip() for result in results} == {str(cache / "remote" / copy_name(s3_model))}
    assert files_under(cache / "remote" / copy_name(s3_model)) == files_under(tiny_model_dir)
    assert cache_entries(cache / "remote") == [copy_name(s3_model)], "no staging directory left behind"


def test_a_model_still_being_uploaded_is_refused_until_every_component_is_there(
    bucket: tuple[s3fs.S3FileSystem, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The reviewer's case: a pod starting while `aws s3 sync` uploads the model (model_index.json
    comes early) copied part of it, and every later start reused that copy: from_pretrained failed
    each time until someone deleted it by hand."""
    fs, name = bucket
    uri, remote = f"s3://{name}/tiny-sd", f"{name}/tiny-sd"
    upload(fs, tiny_model_dir, remote, ["scheduler", "model_index.json"])
    with pytest.raises(ModelSourceError) as refused:
        resolve_model(uri, tmp_path / "cache")
    assert str(refused.value) == (
        f"--model {uri!r}: model_index.json names text_encoder, tokenizer, unet, vae but there is no "
        "such folder there (is the upload still going on?)"
    )
    assert not (tmp_path / "cache" / "remote" / copy_name(uri)).exists()
    upload(fs, tiny_model_dir, remote, ["text_encoder", "tokenizer", "unet", "vae", "BUILTIN.json"])
    location = resolve_model(uri, tmp_path / "cache")
    assert files_under(Path(location.name_or_path)) == files_under(tiny_model_dir)


def test_a_file_that_reaches_the_store_after_the_copy_is_fetched_at_the_next_start(
    bucket: tuple[s3fs.S3FileSystem, str],
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every component folder is there but the UNet's weights are not yet: the copy made then is
    whole as far as anyone can tell, and the next start finds the store has more and fetches that."""
    fs, name = bucket
    uri, remote = f"s3://{name}/tiny-sd", f"{name}/tiny-sd"
    fs.put(f"{tiny_model_dir}/", f"{remote}/", recursive=True)
    fs.rm(f"{remote}/unet/diffusion_pytorch_model.safetensors")
    first = Path(resolve_model(uri, tmp_path / "cache").name_or_path)
    assert "unet/diffusion_pytorch_model.safetensors" not in model_files(first)
    upload(fs, tiny_model_dir, remote, ["unet"])
    caplog.set_level(logging.INFO, logger="diffusion_worker")
    second = Path(resolve_model(uri, tmp_path / "cache").name_or_path)
    assert second == first
    assert files_under(second) == files_under(tiny_model_dir)
    assert copy_logged(caplog, uri) == (1, len(files_under(tiny_model_dir)) - 1), "only the new file"


def test_a_file_changed_or_removed_in_the_store_is_changed_in_the_copy_and_the_rest_kept(
    bucket: tuple[s3fs.S3FileSystem, str],
    s3_model: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs, name = bucket
    copy = Path(resolve_model(s3_model, tmp_path / "cache").name_or_path)
    config = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    changed = json.dumps({**config, "scaling_factor": 0.13}).encode()
    fs.pipe(f"{name}/tiny-sd/vae/config.json", changed)
    fs.rm(f"{name}/tiny-sd/BUILTIN.json")
    caplog.set_level(logging.INFO, logger="diffusion_worker")
    assert Path(resolve_model(s3_model, tmp_path / "cache").name_or_path) == copy
    expected = files_under(tiny_model_dir)
    expected["vae/config.json"] = changed
    del expected["BUILTIN.json"]
    assert files_under(copy) == expected
    assert copy_logged(caplog, s3_model) == (1, len(expected) - 1)
    assert cache_entries(tmp_path / "cache" / "remote") == [copy_name(s3_model)], "nothing left beside it"


def test_an_unreachable_store_leaves_the_copy_in_use_with_a_warning(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting with the store down worked before (a copy was never checked); it still does, and
    says the copy may be out of date. Without a copy the start fails, naming the store's error."""
    server = SeaweedServer(tmp_path / "seaweedfs")
    server.start()
    try:
        for variable, value in server.endpoint.env.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one refused connection, not botocore's retries
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("models")
        fs.put(f"{tiny_model_dir}/", "models/tiny-sd/", recursive=True)
        copy = resolve_model("s3://models/tiny-sd", tmp_path / "cache")
    finally:
        server.stop()
    caplog.set_level(logging.WARNING)
    assert resolve_model("s3://models/tiny-sd", tmp_path / "cache") == copy
    assert f"using the copy at {copy.name_or_path} as it was last fetched" in caplog.text
    assert "EndpointConnectionError" in caplog.text
    with pytest.raises(ModelSourceError) as failed:
        resolve_model("s3://models/tiny-sd", tmp_path / "empty-cache")
    message = str(failed.value)
    assert message.startswith("--model 's3://models/tiny-sd': cannot list it: EndpointConnectionError: ")
    assert "AWS_ENDPOINT_URL" in message


def test_an_update_the_store_cannot_finish_leaves_the_copy_in_use_with_a_warning(
    bucket: tuple[s3fs.S3FileSystem, str],
    s3_model: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new version uploaded over the old one: while its VAE is not there yet, pods keep starting
    on the whole copy they have instead of failing (and the next start fetches the new version)."""
    fs, name = bucket
    copy = resolve_model(s3_model, tmp_path / "cache")
    fs.rm(f"{name}/tiny-sd/vae", recursive=True)
    caplog.set_level(logging.WARNING)
    assert resolve_model(s3_model, tmp_path / "cache") == copy
    assert files_under(Path(copy.name_or_path)) == files_under(tiny_model_dir)
    assert "model_index.json names vae but there is no such folder there" in caplog.text
    assert f"using the copy at {copy.name_or_path} as it was last fetched" in caplog.text


def test_a_copy_made_by_an_older_version_is_mentioned_and_left_alone(
    s3_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its folder name had no hash, so it may be another URI's; a worker of that version may still be
    loading from it during a rolling update. It is fetched again under the new name, once."""
    older = tmp_path / "cache" / "remote" / s3_model.replace("://", "_").replace("/", "_")
    older.mkdir(parents=True)
    (older / "model_index.json").write_text("{}")
    caplog.set_level(logging.INFO)
    resolve_model(s3_model, tmp_path / "cache")
    assert f"{older}, copied by an older worker version, is no longer used" in caplog.text
    assert (older / "model_index.json").exists()


def test_models_whose_uris_differ_only_in_punctuation_get_copies_of_their_own(
    bucket: tuple[s3fs.S3FileSystem, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    """s3://B/sdxl/v1 and s3://B/sdxl_v1 were both copied to `s3_B_sdxl_v1`: the second served the
    first's weights."""
    fs, name = bucket
    fs.put(f"{tiny_model_dir}/", f"{name}/sdxl/v1/", recursive=True)
    fs.put(f"{tiny_model_dir}/", f"{name}/sdxl_v1/", recursive=True)
    fs.pipe(f"{name}/sdxl_v1/BUILTIN.json", b'{"other": "model"}')
    first = Path(resolve_model(f"s3://{name}/sdxl/v1", tmp_path / "cache").name_or_path)
    second = Path(resolve_model(f"s3://{name}/sdxl_v1", tmp_path / "cache").name_or_path)
    assert first != second
    assert (first / "BUILTIN.json").read_bytes() == (tiny_model_dir / "BUILTIN.json").read_bytes()
    assert (second / "BUILTIN.json").read_bytes() == b'{"other": "model"}'


def test_a_model_under_a_long_prefix_is_copied(
    bucket: tuple[s3fs.S3FileSystem, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The folder name was the whole URI: past 255 bytes, mkdir failed with `File name too long`."""
    fs, name = bucket
    prefix = "/".join(letter * 100 for letter in "abc")
    fs.put(f"{tiny_model_dir}/", f"{name}/{prefix}/tiny-sd/", recursive=True)
    location = resolve_model(f"s3://{name}/{prefix}/tiny-sd", tmp_path / "cache")
    assert files_under(Path(location.name_or_path)) == files_under(tiny_model_dir)


KILLED_MID_COPY = """
import os, sys
from pathlib import Path
import s3fs
get_file = s3fs.S3FileSystem._get_file
async def get_file_then_die(self, rpath, lpath, **kwargs):
    await get_file(self, rpath, lpath, **kwargs)
    if rpath.endswith("unet/diffusion_pytorch_model.safetensors"):
        os.truncate(lpath, os.path.getsize(lpath) // 2)
        os._exit(9)  # as SIGKILL would half way through the file: a pod past its startup budget
s3fs.S3FileSystem._get_file = get_file_then_die
from diffusion_worker.model_source import resolve_model
resolve_model(sys.argv[1], Path(sys.argv[2]))
"""


def test_a_copy_killed_part_way_is_resumed_and_its_half_written_file_fetched_again(
    s3_model: str, tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the next start deleted the killed copy and began again from nothing: a copy longer
    than the pod's startup budget could never finish."""
    cache = tmp_path / "cache"
    died = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COPY, s3_model, str(cache)], capture_output=True, timeout=300
    )
    assert died.returncode == 9, died.stderr.decode(errors="replace")
    caplog.set_level(logging.INFO, logger="diffusion_worker")
    location = resolve_model(s3_model, cache)
    assert files_under(Path(location.name_or_path)) == files_under(tiny_model_dir), "no half file kept"
    fetched, kept = copy_logged(caplog, s3_model)
    assert kept >= 1 and fetched + kept == len(files_under(tiny_model_dir)), (fetched, kept)
    assert cache_entries(cache / "remote") == [copy_name(s3_model)]


def test_a_store_that_refuses_access_is_not_blamed_on_the_cache_dir(
    s3_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong secret key (PermissionError from s3fs) was reported as `could not prepare ... under
    --cache-dir`, sending whoever read it to look at the volume."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    settings = WorkerSettings(model=s3_model, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelLoadError) as failed:
        DiffusersEngine.load(settings, "cpu")
    message = str(failed.value)
    assert message.startswith(f"--model {s3_model!r}: cannot list it: PermissionError: "), message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert "--cache-dir" not in message


def test_missing_credentials_stop_start_up_with_one_line_naming_the_model(
    s3_model: str, tmp_path: Path, seaweedfs: S3Endpoint
) -> None:
    """botocore's NoCredentialsError is no OSError: it escaped load_engines as a traceback."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=seaweedfs.url,
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",  # no instance metadata service to ask (and wait for)
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    command = [sys.executable, "-m", "diffusion_worker", "serve", "--model", s3_model, "--device", "cpu"]
    command += ["--cache-dir", str(tmp_path / "cache")]
    started = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 1, started.stderr
    assert "Traceback" not in started.stderr, started.stderr
    assert (
        f"cannot start: --model {s3_model!r}: cannot list it: NoCredentialsError: Unable to locate "
        "credentials (credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL, AWS_REGION)"
    ) in started.stderr


KILLED_MID_BUILD = """
import os, sys
from pathlib import Path
import diffusers
save = diffusers.DiffusionPipeline.save_pretrained
def save_then_die(self, directory, **kwargs):
    save(self, directory, **kwargs)
    os._exit(9)  # as SIGKILL, an OOM kill or an eviction would, before the rename into place
diffusers.DiffusionPipeline.save_pretrained = save_then_die
from diffusion_worker.model_source import resolve_model
resolve_model("builtin:tiny-sd", Path(sys.argv[1]))
"""


def test_a_build_killed_part_way_leaves_nothing_once_the_next_process_has_built_the_model(
    tmp_path: Path,
) -> None:
    """The tiny-sd builder staged in a folder the cache's clean-up pattern missed (`..tiny-sd...`):
    each killed build left its 6.5 MB behind for good."""
    died = subprocess.run(
        [sys.executable, "-c", KILLED_MID_BUILD, str(tmp_path)], capture_output=True, timeout=300
    )
    assert died.returncode == 9, died.stderr.decode(errors="replace")
    left = [path.name for path in (tmp_path / "builtin").iterdir() if not path.name.endswith(".lock")]
    assert left and all(name.startswith(".tiny-sd.partial-") for name in left), left
    resolve_model("builtin:tiny-sd", tmp_path)
    remaining = sorted(
        path.name for path in (tmp_path / "builtin").iterdir() if not path.name.endswith(".lock")
    )
    assert remaining == ["tiny-sd"]
