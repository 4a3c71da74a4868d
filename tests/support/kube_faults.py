"""Fault injection for the API emulator: a seeded random share of the operator's requests is
answered with an error (or a dropped watch) before the emulator sees them.

Only the operator's requests are faulted (kopf and the Kubernetes client); the test's own requests
(python-requests, standing in for kubectl) always go through.
"""

from __future__ import annotations

import functools
import random
import threading
from collections import Counter
from collections.abc import Mapping

import kmock

from support.kube_emulator import REQUEST_LOG_LIMIT, KubeApiEmulator

WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _status(code: int, reason: str) -> dict[str, object]:
    message = f"injected fault: {reason}"
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


# fault -> (which requests it may hit, the answer)
FAULTS: dict[str, kmock.Response] = {
    "watch_dropped": kmock.Response(status=200, payload=b""),  # the stream ends at once, as if cut
    "throttled": kmock.Response(
        status=429, headers={"Retry-After": "1"}, payload=_status(429, "TooManyRequests")
    ),
    "server_error": kmock.Response(status=500, payload=_status(500, "InternalError")),
    "conflict": kmock.Response(status=409, payload=_status(409, "Conflict")),
}


class FaultInjector:
    """Decides once per request, with its own seeded generator, whether and how to fault it.

    `rates` gives each fault's probability: `watch_dropped` applies to watch requests, `throttled`
    to any other request, `server_error` to writes, `conflict` to PATCH and PUT. `injected` counts
    what was answered with a fault; `active = False` stops injecting.
    """

    def __init__(self, emulator: KubeApiEmulator, rates: Mapping[str, float], seed: int = 0) -> None:
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        self.rates = dict(rates)
        self.random = random.Random(seed)
        self.active = True
        self.injected: Counter[str] = Counter()
        self.operator_requests = 0
        # kmock re-evaluates filters over its (recent) request log, so each decision is memoised per
        # request object; the request is kept alongside so its id() is not reused while memoised.
        self._decisions: dict[int, tuple[kmock.Request, str | None]] = {}
        self._lock = threading.Lock()
        for fault, response in FAULTS.items():
            emulator[functools.partial(self._is, fault)] << response

    def _is(self, fault: str, request: kmock.Request) -> bool:
        with self._lock:
            key = id(request)
            if key not in self._decisions:
                decision = self._decide(request)
                self._decisions[key] = (request, decision)
                if decision is not None:
                    self.injected[decision] += 1
                if len(self._decisions) > 4 * REQUEST_LOG_LIMIT:  # beyond kmock's log: never asked again
                    del self._decisions[next(iter(self._decisions))]
            return self._decisions[key][1] == fault

    def _decide(self, request: kmock.Request) -> str | None:
        if not self.active or request.headers.get("User-Agent", "").startswith("python-requests"):
            return None
        self.operator_requests += 1
        method = str(request.method.value).upper()
        if request.params.get("watch") in ("true", "1"):
            candidates = ["watch_dropped"]
        else:
            candidates = ["throttled"]
            if method in WRITES:
                candidates.append("server_error")
            if method in ("PATCH", "PUT"):
                candidates.append("conflict")
        for fault in candidates:
            if self.random.random() < self.rates.get(fault, 0.0):
                return fault
        return None
