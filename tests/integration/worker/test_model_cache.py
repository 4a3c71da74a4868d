"""The model cache: an `s3://` model is copied into it and served, and processes that share it
(replicas on one ReadWriteMany volume, context-parallel ranks) write each model once, whole.

Real parts: SeaweedFS as the S3 server, separate worker processes started together on one cache
directory, the real worker serving the copied model to the official openai client.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import s3fs

from diffusion_worker.model_source import resolve_model
from support.seaweedfs import S3Endpoint

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., str]

# Imports first, then waits for the go file, so every process asks for the model at the same moment.
RESOLVE_TOGETHER = """
import logging, sys, time
from pathlib import Path
from diffusion_worker.model_source import resolve_model
import diffusers, torch  # what loading the model would import anyway, before the start line

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
model, cache, go, ready = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
print(resolve_model(model, Path(cache)).name_or_path)
"""


@pytest.fixture
def s3_model(seaweedfs: S3Endpoint, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The tiny pipeline uploaded to a bucket; the S3 endpoint and keys in the environment."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"models-{os.getpid()}-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    fs.put(f"{tiny_model_dir}/", f"{bucket}/tiny-sd/", recursive=True)
    yield f"s3://{bucket}/tiny-sd"
    fs.rm(bucket, recursive=True)


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()
    }


def resolve_together(model: str, cache: Path, processes: int) -> list[subprocess.CompletedProcess[str]]:
    """`resolve_model(model, cache)` in `processes` separate Python processes at the same moment."""
    go = cache.parent / "go"
    started = []
    for index in range(processes):
        ready = cache.parent / f"ready-{index}"
        command = [sys.executable, "-c", RESOLVE_TOGETHER, model, str(cache), str(go), str(ready)]
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
    return uri.replace("://", "_").replace("/", "_")


def writers(results: list[subprocess.CompletedProcess[str]]) -> int:
    return sum("diffusion_worker.model_source writing " in result.stderr for result in results)


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


def test_a_copy_left_half_written_by_a_process_that_died_is_replaced(
    s3_model: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A worker killed mid-download (OOM-killed, node lost) leaves its staging directory behind."""
    from diffusion_worker.model_source import resolve_model

    cache = tmp_path / "cache"
    leftover = cache / "remote" / f".{copy_name(s3_model)}.partial-gone-host-123"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    location = resolve_model(s3_model, cache)
    assert files_under(Path(location.name_or_path)) == files_under(tiny_model_dir)
    assert not leftover.exists()


def test_a_copy_logs_its_size_and_progress(
    s3_model: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A big model takes minutes to copy; the log says how far it is (here on every update)."""
    from diffusion_worker import model_source

    monkeypatch.setattr(model_source, "PROGRESS_LOG_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="diffusion_worker.model_source")
    model_source.resolve_model(s3_model, tmp_path / "cache")
    files = files_under(tiny_model_dir)
    size = f"{sum(len(data) for data in files.values()) / 2**20:.1f} MiB"
    lines = [record.getMessage() for record in caplog.records]
    assert f"copying {s3_model}: {len(files)} files, {size}" in lines
    progress = [line for line in lines if line.startswith(f"copying {s3_model}: ") and " of " in line]
    assert progress[-1] == f"copying {s3_model}: {size} of {size}"
    assert lines[-1].startswith(f"copied {s3_model}: {size} in ")


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
