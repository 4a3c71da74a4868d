"""A small synchronous Kubernetes API client: get, server-side apply, status patch, in any group.

Built on the official `kubernetes` package for configuration and auth (in-cluster or kubeconfig),
so the operator authenticates exactly as kopf's own login does.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import kubernetes

from diffusion_operator import constants as c

# The API server refuses longer Event messages.
MAX_EVENT_MESSAGE = 1024

# kind -> plural of every kind the operator reads or writes.
PLURALS: dict[str, str] = {
    "Deployment": "deployments",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    c.KIND: c.PLURAL,
}


# A server-side apply whose object does not fit the kind's schema (an env value given as a number
# in spec.pod.env, a misspelled affinity field) is answered 500 with this message, not 4xx
# (kubernetes/kubernetes#122480, #139253): retrying cannot help, so it is not transient.
SSA_SCHEMA_ERROR = "failed to create typed patch object"


class ApiError(Exception):
    """A non-2xx answer from the API server; `request` ("GET /apis/apps/v1/...") says to what, so a
    status condition can name the object the operator could not read or write."""

    def __init__(
        self, status: int, message: str, retry_after: float | None = None, request: str = ""
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.request = request

    @property
    def transient(self) -> bool:
        """Conflicts, throttling, server errors and timeouts fix themselves on retry; a 500 that is
        the server refusing the object itself (SSA_SCHEMA_ERROR) does not."""
        if self.status == 500 and SSA_SCHEMA_ERROR in self.message:
            return False
        return self.status in (409, 429) or self.status >= 500 or self.status == 0


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """REST path of a namespaced object (or of its collection when name is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def load_api_client() -> kubernetes.client.ApiClient:
    """An ApiClient configured in-cluster, else from $KUBECONFIG / ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # Read $KUBECONFIG now: the kubernetes package freezes its default path at import time.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return kubernetes.client.ApiClient(configuration)


class KubeApi:
    """The few calls the operator makes; every answer is plain JSON-like data."""

    def __init__(self, api_client: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        self._client = api_client
        self._timeout = timeout

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; returns the decoded JSON body, raises ApiError on a non-2xx status."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        what = f"{method} {path}"
        try:
            response = self._client.call_api(*serialized, _request_timeout=self._timeout)
            response.read()
        except kubernetes.client.ApiException as exc:  # raised for 429/503 with Retry-After
            raise ApiError(
                int(exc.status or 0), str(exc.reason), _retry_after(exc.headers), request=what
            ) from exc
        except Exception as exc:  # connection refused, reset, timeout
            raise ApiError(0, f"{type(exc).__name__}: {exc}", request=what) from exc
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status <= 299:
            message = text
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(text).get("message", text)
            raise ApiError(response.status, message, _retry_after(response.getheaders()), request=what)
        return json.loads(text) if text else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The objects of `kind` in `namespace` that match `label_selector`."""
        result = self.request(
            "GET", object_path(api_version, kind, namespace), query={"labelSelector": label_selector}
        )
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with the operator's field manager, taking over fields others changed by hand."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        result: dict[str, Any] = self.request(
            "PATCH",
            path,
            query={"fieldManager": c.FIELD_MANAGER, "force": "true"},
            body=dict(manifest),
            content_type="application/apply-patch+yaml",
        )
        return result

    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about `involved` (an object as read from the API), as kopf's own
        poster writes them: for passes that run outside kopf's handlers (the resync loop)."""
        meta = involved["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_EVENT_MESSAGE],
            "source": {"component": c.OPERATOR_NAME},
            "reportingComponent": c.OPERATOR_NAME,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body=event)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource of an ImageDiffusionService."""
        path = object_path(c.API_VERSION, c.KIND, namespace, name) + "/status"
        result: dict[str, Any] = self.request(
            "PATCH", path, body={"status": dict(status)}, content_type="application/merge-patch+json"
        )
        return result


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
