"""Helpers of the reliability scenarios: figures to report, percentiles, a process memory sampler."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any


class Figures:
    """What each scenario measured, by scenario name."""

    def __init__(self) -> None:
        self.scenarios: dict[str, dict[str, Any]] = {}

    def record(self, scenario: str, **values: Any) -> None:
        """Add `values` to the figures of `scenario`."""
        self.scenarios.setdefault(scenario, {}).update(values)


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` quantile (nearest rank) of `values`, rounded to milliseconds; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1
    return round(ordered[index], 3)


class MemorySampler:
    """Samples a process's resident set size (VmRSS, Linux /proc) every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in self.path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) * 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
