"""An in-process Kubernetes API emulator, built on kmock, for what the operator relies on.

kmock (PyPI) gives the HTTP server, request parsing, API discovery and a reaction DSL; its own
KubernetesEmulator only merges JSON. This class keeps its own store and reproduces kube-apiserver
semantics instead:

- server-filled metadata: uid, resourceVersion (one cluster-wide counter), creationTimestamp,
  generation; generateName; 201 on create, 409 AlreadyExists on a duplicate name;
- metadata.generation bumps on changes outside metadata and status only;
- a separate /status subresource for kinds that declare it (status writes to the main resource and
  spec writes to /status are ignored);
- 409 Conflict on a stale metadata.resourceVersion (PATCH precondition, PUT);
- JSON patch, JSON merge patch, strategic merge patch (approximated as merge patch), and server-side
  apply (application/apply-patch+yaml, fieldManager, force): fields a manager applied before and
  leaves out now are removed; an apply that changes nothing writes nothing (no resourceVersion bump);
- list and watch with labelSelector / fieldSelector (metadata.name, metadata.namespace), watch from a
  resourceVersion (410 Gone when older than the retained history), timeoutSeconds;
- finalizers and deletionTimestamp; ownerReference garbage collection (dependents whose owners are
  all gone are deleted, recursively, including ones created after their owners were deleted;
  propagationPolicy=Orphan strips the reference instead);
- creating a CustomResourceDefinition serves its resource (discovery included).

Not emulated (the cluster tier covers them): schema validation, defaulting and CEL admission,
per-field ownership (lists are atomic for apply, and there are no apply conflicts without force),
namespace existence (objects may name any namespace), RBAC, admission webhooks, the controllers
(no ReplicaSets or Pods: tests patch Deployment status themselves), and asynchronous GC (here it
runs at once).

Fault injection: every request first meets the kmock DSL, so a test can answer with an error before
any state changes, e.g. ``emulator['patch', kmock.resource('apps', 'v1', 'deployments')] << 500``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

HISTORY_LIMIT = 5000
# kmock logs every request and matches each new one by scanning that log once per reaction, which is
# quadratic: on a 2-core machine, 90 ms per request after 1,000 requests and 230 ms after 2,000,
# enough to time out a soak run. Only the latest few are kept (a request is matched right after it
# is logged, before any await); nothing here reads further back. 8 costs ~8 ms a request here.
REQUEST_LOG_LIMIT = 8

JSON = dict[str, Any]


@dataclasses.dataclass
class Kind:
    """What the emulator knows about one resource."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    has_status: bool = False

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


BUILTIN_KINDS = [
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, has_status=True),
    Kind("", "v1", "events", "Event"),
    Kind("", "v1", "services", "Service", has_status=True),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", has_status=True),
    Kind("", "v1", "pods", "Pod", has_status=True),
    Kind("", "v1", "secrets", "Secret"),
    Kind("apps", "v1", "deployments", "Deployment", has_status=True),
    Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", has_status=True),
    Kind("events.k8s.io", "v1", "events", "Event"),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
         namespaced=False, has_status=True),
]  # fmt: skip


def _parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock reads /api/v1/namespaces[/NAME] as a namespace prefix; address the Namespace resource instead."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        return kmock_parsing.ParsedPath(
            "", "v1", "namespaces", None, name, parts[4] if len(parts) > 4 else None
        )
    return _kmock_parse_path(path)


# kopf needs the namespaces resource (discovery always; list/watch when not cluster-wide).
_kmock_parse_path = kmock_parsing.parse_path
kmock_parsing.parse_path = _parse_path


def _ok(payload: Any, status: int = 200) -> kmock.Response:
    """Always name the status: kmock keeps the last Response status on a reaction for later answers."""
    return kmock.Response(status=status, payload=copy.deepcopy(payload))


def api_error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={"reason": reason})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(target: JSON, ops: list[JSON]) -> JSON:
    """RFC 6902 JSON patch (add, remove, replace, test)."""
    result = copy.deepcopy(target)
    for op in ops:
        *parents, leaf = _pointer(op["path"])
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind == "test":
            current = node[int(leaf)] if isinstance(node, list) else node.get(leaf)
            if current != op["value"]:
                raise api_error(422, "Invalid", f"test failed at {op['path']}")
        elif kind == "remove":
            del node[int(leaf) if isinstance(node, list) else leaf]
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                if leaf == "-":
                    node.append(op["value"])
                elif kind == "add":
                    node.insert(int(leaf), op["value"])
                else:
                    node[int(leaf)] = op["value"]
            else:
                node[leaf] = op["value"]
        else:
            raise api_error(422, "Invalid", f"unsupported JSON patch op {kind!r}")
    return result


def _strip_applied(live: Any, previous: Any, current: Any) -> Any:
    """Remove from `live` what a manager applied before (`previous`) and no longer applies (`current`)."""
    if not isinstance(live, dict) or not isinstance(previous, dict):
        return live
    result = dict(live)
    for key, value in previous.items():
        if key not in result:
            continue
        if not isinstance(current, dict) or key not in current:
            del result[key]
        elif isinstance(value, dict):
            result[key] = _strip_applied(result[key], value, current[key])
    return result


def _apply_merge(live: Any, intent: Any) -> Any:
    """Merge an apply intent: objects merge recursively, lists and scalars are replaced (atomic)."""
    if not isinstance(intent, dict) or not isinstance(live, dict):
        return copy.deepcopy(intent)
    result = dict(live)
    for key, value in intent.items():
        result[key] = _apply_merge(result.get(key), value)
    return result


_SELECTOR_TERM = re.compile(r"([^,(]+(?:\([^)]*\))?)")


def parse_label_selector(text: str) -> list[Callable[[dict[str, str]], bool]]:
    """Label selector string -> predicates (=, ==, !=, in, notin, exists, !exists)."""
    predicates: list[Callable[[dict[str, str]], bool]] = []
    for raw in _SELECTOR_TERM.findall(text or ""):
        term = raw.strip()
        if not term:
            continue
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if op == "in":
                predicates.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                predicates.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif term.startswith("!"):
            absent = term[1:].strip()
            predicates.append(lambda labels, k=absent: k not in labels)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            predicates.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            predicates.append(lambda labels, k=key, v=value: labels.get(k) == v)
        else:
            predicates.append(lambda labels, k=term: k in labels)
    return predicates


def parse_field_selector(text: str) -> list[Callable[[JSON], bool]]:
    """metadata.name and metadata.namespace field selectors (= / == / !=)."""
    predicates: list[Callable[[JSON], bool]] = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        negate = "!=" in term
        field, value = (s.strip() for s in term.replace("==", "=").replace("!=", "=").split("=", 1))
        if field not in ("metadata.name", "metadata.namespace"):
            raise api_error(400, "BadRequest", f"field label not supported: {field}")
        attr = field.split(".")[1]
        predicates.append(lambda obj, a=attr, v=value, n=negate: (obj["metadata"].get(a) == v) != n)
    return predicates


@attrs.define(kw_only=True)
class KubeApiEmulator(kmock.KubernetesScaffold):
    """kube-apiserver semantics over kmock (see the module docstring for what is and is not emulated)."""

    _kinds: dict[str, Kind] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str | None, str], JSON] = attrs.field(factory=dict, init=False)
    _applied: dict[tuple[str, str | None, str, str], JSON] = attrs.field(factory=dict, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _history: list[tuple[int, str, JSON]] = attrs.field(factory=list, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    _changed: asyncio.Condition | None = attrs.field(default=None, init=False)
    # Every state change: (verb, resource key, namespace, name). Tests assert "no writes" with it.
    writes: list[tuple[str, str, str | None, str]] = attrs.field(factory=list, init=False)
    # Every watch opened: (resource key, its labelSelector). Tests check what the operator streams.
    watches: list[tuple[str, str]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in BUILTIN_KINDS:
            self.add_kind(kind)
        self.fallback[kmock.action.WATCH] << self._serve_watch
        self.fallback[kmock.action.LIST] << self._serve_list
        self.fallback[kmock.action.FETCH] << self._serve_get
        self.fallback[kmock.action.CREATE] << self._serve_create
        self.fallback[kmock.action.UPDATE] << self._serve_patch
        self.fallback[kmock.action.DELETE] << self._serve_delete
        self.fallback[kmock.method.PUT] << self._serve_put

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        del self._requests[:-REQUEST_LOG_LIMIT]
        for reaction in self._payloads:
            del reaction._requests[:-REQUEST_LOG_LIMIT]
        return await super()._handle(request)

    # --- resources ---

    def add_kind(self, kind: Kind) -> None:
        """Serve a resource (and list it in discovery)."""
        self._kinds[kind.key] = kind
        self.resources[kmock.resource(kind.group, kind.version, kind.plural)] = kmock.ResourceInfo(
            kind=kind.kind,
            singular=kind.kind.lower(),
            namespaced=kind.namespaced,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"} if kind.has_status else set(),
        )

    def _kind_of(self, request: kmock.Request) -> Kind:
        res = request.resource
        key = f"{res.group}/{res.version}/{res.plural}" if res is not None else ""
        if key not in self._kinds:
            raise api_error(404, "NotFound", f"the server could not find the requested resource {key}")
        return self._kinds[key]

    def _register_crd(self, crd: JSON) -> None:
        spec = crd.get("spec", {})
        for version in spec.get("versions", []):
            if version.get("served", True):
                self.add_kind(
                    Kind(
                        spec["group"],
                        version["name"],
                        spec["names"]["plural"],
                        spec["names"]["kind"],
                        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                        has_status="status" in (version.get("subresources") or {}),
                    )
                )

    # --- state changes (synchronous: atomic within the event loop) ---

    def _record(self, event_type: str, kind: Kind, obj: JSON, verb: str) -> None:
        self._history.append((self._revision, kind.key, {"type": event_type, "object": copy.deepcopy(obj)}))
        if len(self._history) > HISTORY_LIMIT:
            dropped = self._history[: len(self._history) - HISTORY_LIMIT]
            self._compacted = dropped[-1][0]
            del self._history[: len(dropped)]
        meta = obj["metadata"]
        self.writes.append((verb, kind.key, meta.get("namespace"), meta["name"]))
        if self._changed is not None:
            condition = self._changed

            async def notify() -> None:
                async with condition:
                    condition.notify_all()

            asyncio.get_running_loop().create_task(notify())

    def _bump(self, obj: JSON) -> None:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)

    def _create(self, kind: Kind, namespace: str | None, body: JSON) -> JSON:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise api_error(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if kind.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise api_error(400, "BadRequest", "the namespace of the object does not match the URL")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = (kind.key, meta.get("namespace"), meta["name"])
        if key in self._store:
            raise api_error(409, "AlreadyExists", f'{kind.plural} "{meta["name"]}" already exists')
        for server_field in ("deletionTimestamp", "resourceVersion"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        if kind.has_status:
            obj.pop("status", None)
        self._bump(obj)
        self._store[key] = obj
        self._record("ADDED", kind, obj, "create")
        if kind.plural == "customresourcedefinitions":
            self._register_crd(obj)
        refs = meta.get("ownerReferences") or []
        if refs and not self._live_uids() & {ref.get("uid") for ref in refs}:
            # Created after its owners were deleted (a controller racing the deletion): the real
            # garbage collector deletes such a dependent soon after; here at once.
            self._delete(kind, key, orphan=False)
        return obj

    def _update(self, kind: Kind, old: JSON, new: JSON, subresource: str | None, verb: str) -> JSON:
        """Store `new` in place of `old` with apiserver rules; no change means no write."""
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = copy.deepcopy(new["status"])
            else:
                result.pop("status", None)
        elif subresource is not None:
            raise api_error(404, "NotFound", f"subresource {subresource} is not served")
        else:
            result = copy.deepcopy(new)
            if kind.has_status:
                result.pop("status", None)
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
        result["apiVersion"], result["kind"] = kind.api_version, kind.kind
        meta = result.setdefault("metadata", {})
        for immutable in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
            if immutable in old["metadata"]:
                meta[immutable] = old["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if result == old:
            return old  # a no-op: no resourceVersion bump, no event
        if {k: v for k, v in result.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._bump(result)
        key = (kind.key, meta.get("namespace"), meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(kind, key, result)
            return result
        self._store[key] = result
        self._record("MODIFIED", kind, result, verb)
        return result

    def _remove(self, kind: Kind, key: tuple[str, str | None, str], obj: JSON, orphan: bool = False) -> None:
        self._store.pop(key, None)
        for applied_key in [k for k in self._applied if k[:3] == key]:
            del self._applied[applied_key]
        self._revision += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._revision)
        self._record("DELETED", kind, gone, "delete")
        self._collect_garbage(obj["metadata"]["uid"], orphan)

    def _delete(self, kind: Kind, key: tuple[str, str | None, str], orphan: bool) -> JSON:
        obj = self._store[key]
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                marked = copy.deepcopy(obj)
                marked["metadata"]["deletionTimestamp"] = _now()
                marked["metadata"]["generation"] = int(meta.get("generation", 1)) + 1
                self._bump(marked)
                self._store[key] = marked
                self._record("MODIFIED", kind, marked, "delete")
                return marked
            return obj
        self._remove(kind, key, obj, orphan)
        return obj

    def _live_uids(self) -> set[str]:
        return {obj["metadata"]["uid"] for obj in self._store.values()}

    def _collect_garbage(self, owner_uid: str, orphan: bool) -> None:
        """Delete dependents whose owners are all gone (background propagation), or orphan them."""
        live_uids = self._live_uids()
        for key, obj in list(self._store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs) or key not in self._store:
                continue
            kind = self._kinds[key[0]]
            if orphan:
                stripped = copy.deepcopy(obj)
                stripped["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                if not stripped["metadata"]["ownerReferences"]:
                    del stripped["metadata"]["ownerReferences"]
                self._update(kind, obj, stripped, None, "gc-orphan")
            elif not any(ref.get("uid") in live_uids for ref in refs):
                self._delete(kind, key, orphan=False)

    # --- helpers ---

    def _key(self, kind: Kind, request: kmock.Request) -> tuple[str, str | None, str]:
        return (kind.key, request.namespace if kind.namespaced else None, request.name or "")

    def _existing(self, kind: Kind, request: kmock.Request) -> JSON:
        key = self._key(kind, request)
        if key not in self._store:
            raise api_error(404, "NotFound", f'{kind.plural} "{request.name}" not found')
        return self._store[key]

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        if request.data is not None:
            return request.data
        try:
            return yaml.safe_load(request.text) if request.text else None
        except yaml.YAMLError as exc:
            raise api_error(400, "BadRequest", f"cannot decode the body: {exc}") from exc

    @staticmethod
    def _check_precondition(old: JSON, body: Any) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise api_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on "{old["metadata"]["name"]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )

    def _matching(self, kind: Kind, request: kmock.Request) -> Iterable[JSON]:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        for (key, namespace, _), obj in sorted(self._store.items(), key=lambda item: item[0]):
            in_scope = key == kind.key and (request.namespace is None or namespace == request.namespace)
            if in_scope and self._selected(obj, labels, fields):
                yield obj

    @staticmethod
    def _selected(
        obj: JSON, labels: list[Callable[[dict[str, str]], bool]], fields: list[Callable[[JSON], bool]]
    ) -> bool:
        obj_labels = obj["metadata"].get("labels") or {}
        return all(p(obj_labels) for p in labels) and all(p(obj) for p in fields)

    # --- endpoints ---

    async def _serve_get(self, request: kmock.Request) -> JSON:
        kind = self._kind_of(request)
        return _ok(self._existing(kind, request))

    async def _serve_list(self, request: kmock.Request) -> JSON:
        kind = self._kind_of(request)
        return _ok(
            {
                "apiVersion": kind.api_version,
                "kind": kind.kind + "List",
                "metadata": {"resourceVersion": str(self._revision)},
                "items": list(self._matching(kind, request)),
            }
        )

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        kind = self._kind_of(request)
        self.watches.append((kind.key, request.params.get("labelSelector", "")))
        if self._changed is None:
            self._changed = asyncio.Condition()
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        timeout = float(request.params.get("timeoutSeconds") or 3600)
        deadline = asyncio.get_running_loop().time() + timeout
        since_text = request.params.get("resourceVersion", "")
        yield b""  # send the headers now: the stream is open even if nothing happens
        if since_text in ("", "0"):
            since = self._revision
            for obj in list(self._matching(kind, request)):
                yield {"type": "ADDED", "object": copy.deepcopy(obj)}
        else:
            since = int(since_text)
            if since < self._compacted:
                expired = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                           "reason": "Expired", "message": f"too old resource version: {since}"}  # fmt: skip
                yield {"type": "ERROR", "object": expired}
                return
        while True:
            seen_up_to = self._revision  # events appended while we yield are picked up next round
            for revision, key, event in list(self._history):
                if revision <= since or key != kind.key:
                    continue
                since = revision
                obj = event["object"]
                if request.namespace is not None and obj["metadata"].get("namespace") != request.namespace:
                    continue
                if self._selected(obj, labels, fields):
                    yield event
            since = max(since, seen_up_to)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))

    async def _serve_create(self, request: kmock.Request) -> Any:
        kind = self._kind_of(request)
        body = self._body(request)
        if not isinstance(body, dict):
            raise api_error(400, "BadRequest", "the body must be an object")
        obj = self._create(kind, request.namespace, body)
        return _ok(obj, 201)

    async def _serve_patch(self, request: kmock.Request) -> Any:
        kind = self._kind_of(request)
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        body = self._body(request)
        key = self._key(kind, request)
        if content_type == "application/apply-patch+yaml":
            return self._server_side_apply(kind, key, request, body)
        old = self._existing(kind, request)
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise api_error(400, "BadRequest", "a JSON patch must be a list of operations")
            new = json_patch(old, body)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise api_error(400, "BadRequest", "a merge patch must be an object")
            self._check_precondition(old, body)
            new = merge_patch(old, body)
        else:
            raise api_error(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
        return _ok(self._update(kind, old, new, request.subresource, "patch"))

    def _server_side_apply(
        self, kind: Kind, key: tuple[str, str | None, str], request: kmock.Request, intent: Any
    ) -> Any:
        manager = request.params.get("fieldManager")
        if not manager:
            raise api_error(422, "Invalid", "fieldManager is required for apply patches")
        if not isinstance(intent, dict):
            raise api_error(400, "BadRequest", "an apply patch must be an object")
        intent = copy.deepcopy(intent)
        if kind.has_status and request.subresource is None:
            intent.pop("status", None)
        applied_key = (*key, manager)
        if key not in self._store:
            if request.subresource is not None:
                raise api_error(404, "NotFound", f'{kind.plural} "{request.name}" not found')
            obj = self._create(kind, request.namespace, intent)
            self._applied[applied_key] = intent
            return _ok(obj, 201)
        old = self._store[key]
        self._check_precondition(old, intent)
        previous = self._applied.get(applied_key, {})
        stripped = _strip_applied(old, previous, intent)
        new = _apply_merge(stripped, intent)
        self._applied[applied_key] = intent
        return _ok(self._update(kind, old, new, request.subresource, "apply"))

    async def _serve_put(self, request: kmock.Request) -> Any:
        kind = self._kind_of(request)
        old = self._existing(kind, request)
        body = self._body(request)
        if not isinstance(body, dict):
            raise api_error(400, "BadRequest", "the body must be an object")
        if not (body.get("metadata") or {}).get("resourceVersion"):
            raise api_error(422, "Invalid", "metadata.resourceVersion: must be specified for an update")
        self._check_precondition(old, body)
        return _ok(self._update(kind, old, body, request.subresource, "update"))

    async def _serve_delete(self, request: kmock.Request) -> Any:
        kind = self._kind_of(request)
        old = self._existing(kind, request)
        body = self._body(request) if request.body else None
        policy = request.params.get("propagationPolicy") or (body or {}).get("propagationPolicy")
        self._check_precondition(old, {"metadata": (body or {}).get("preconditions") or {}})
        return _ok(self._delete(kind, self._key(kind, request), orphan=policy == "Orphan"))

    # --- direct access for tests (same thread as the server loop, or via EmulatorThread.call) ---

    def peek(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> JSON | None:
        """The stored object (a copy), or None."""
        obj = self._store.get((f"{group}/{version}/{plural}", namespace, name))
        return copy.deepcopy(obj) if obj is not None else None


class EmulatorThread:
    """Runs a KubeApiEmulator on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator = KubeApiEmulator()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._main(),), daemon=True
        )

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the API emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self) -> str:
        """A kubeconfig (YAML text) pointing at the emulator, without credentials."""
        return yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulated"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
            "current-context": "emulator",
        })  # fmt: skip


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
