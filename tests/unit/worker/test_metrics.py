"""The worker's Prometheus metrics as a scrape sees them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from diffusion_worker import metrics as metrics_module
from diffusion_worker.metrics import CANCELLATION_REASONS, FAILURE_REASONS, REJECTION_REASONS, WorkerMetrics

COUNTER_REASONS = {
    "failed": ("diffusion_worker_failed_requests_total", FAILURE_REASONS),
    "rejected": ("diffusion_worker_rejected_requests_total", REJECTION_REASONS),
    "cancelled": ("diffusion_worker_cancelled_requests_total", CANCELLATION_REASONS),
}


@pytest.mark.parametrize(
    "series",
    [
        'diffusion_worker_failed_requests_total{reason="device_failed"} 0.0',
        'diffusion_worker_failed_requests_total{reason="out_of_memory"} 0.0',
        'diffusion_worker_rejected_requests_total{reason="queue_full"} 0.0',
        'diffusion_worker_cancelled_requests_total{reason="client_disconnected"} 0.0',
    ],
)
def test_every_reason_has_a_series_at_zero_before_its_first_event(series: str) -> None:
    """Before, a series appeared at its first increment, at 1: increase() and rate() saw no change,
    so an alert on them missed the first failure of each kind."""
    assert series in generate_latest(WorkerMetrics().registry).decode().splitlines()


@pytest.mark.parametrize("attribute", sorted(COUNTER_REASONS))
def test_every_reason_the_code_counts_is_listed(attribute: str) -> None:
    """The lists are the one source of truth: a reason counted in the code but missing from its
    list would again have no series until it first happens."""
    name, listed = COUNTER_REASONS[attribute]
    source = "\n".join(path.read_text() for path in Path(metrics_module.__file__).parent.glob("*.py"))
    used = set(re.findall(rf"\.{attribute}\.labels\(reason=\"(\w+)\"\)", source))
    assert used, f"no {attribute}.labels(reason=...) found: has the code changed shape?"
    assert used <= set(listed), name
    exposed = generate_latest(WorkerMetrics().registry).decode()
    for reason in listed:
        assert f'{name}{{reason="{reason}"}} 0.0' in exposed
