"""The operator under test: a raw HTTP client for the API emulator and the operator in a thread."""

from __future__ import annotations

import threading
from typing import Any

import requests
import yaml


class Client:
    """Raw HTTP against the emulator, as kubectl would talk to a real API server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.request("POST", path, json=body)

    def merge_patch(self, path: str, body: Any) -> requests.Response:
        return self.request(
            "PATCH", path, data=yaml.safe_dump(body), headers={"Content-Type": "application/merge-patch+json"}
        )

    def apply(self, path: str, body: Any, manager: str = "kubectl", force: bool = True) -> requests.Response:
        return self.request(
            "PATCH",
            path,
            params={"fieldManager": manager, "force": str(force).lower()},
            data=yaml.safe_dump(body),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


class OperatorThread:
    """`diffusion_operator.__main__.run_operator` (kopf, standalone) in a background thread."""

    def __init__(self, worker_image: str = "registry.test/worker:dev") -> None:
        from diffusion_operator.config import OperatorConfig

        self.config = OperatorConfig(worker_image=worker_image, log_format="plain")
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from diffusion_operator.__main__ import run_operator

        try:
            run_operator(self.config, stop_flag=self.stop_flag, ready_flag=self.ready_flag, liveness=False)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> OperatorThread:
        self.thread.start()
        assert self.ready_flag.wait(20), f"the operator did not start: {self.error!r}"
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the operator did not stop"
