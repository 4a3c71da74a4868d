"""Prometheus metrics of one worker, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
ENCODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Every `reason` each labelled counter is incremented with (tests/unit/worker/test_metrics.py checks
# the code uses no other). Their series exist at 0 from the start: one born at its first increment
# starts at 1, and increase() or rate() over it see no change, so an alert missed the first of each.
FAILURE_REASONS = (
    "out_of_memory",
    "pipeline_error",
    "moderation_blocked",
    "storage",
    "internal_error",
    "shutdown",
    "device_failed",
)
REJECTION_REASONS = ("queue_full", "shutting_down", "device_failed")
CANCELLATION_REASONS = ("client_disconnected", "timeout")


class WorkerMetrics:
    """The worker's counters, gauges and histograms; `/metrics` exposes `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diffusion_worker_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "diffusion_worker_requests_in_flight", "HTTP requests being handled.", registry=self.registry
        )
        self.images_generated = Counter(
            "diffusion_worker_images_generated", "Images generated.", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "diffusion_worker_generation_seconds",
            "Time of one pipeline call.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.encode_seconds = Histogram(
            "diffusion_worker_encode_seconds",
            "Wall time to encode the images of one response or streamed event (on the encoder threads), "
            "by output format.",
            ["output_format"],
            buckets=ENCODE_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "diffusion_worker_queue_wait_seconds",
            "Time a batch waited for a free pipeline.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "diffusion_worker_batch_size",
            "Images per pipeline call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "diffusion_worker_queue_images", "Images queued or running.", registry=self.registry
        )
        self.rejected = Counter(
            "diffusion_worker_rejected_requests",
            "Requests refused before generation, by reason (queue_full, shutting_down, device_failed).",
            ["reason"],
            registry=self.registry,
        )
        with_series(self.rejected, REJECTION_REASONS)
        self.cancelled = Counter(
            "diffusion_worker_cancelled_requests",
            "Accepted requests whose work was dropped, by reason (client_disconnected, timeout).",
            ["reason"],
            registry=self.registry,
        )
        with_series(self.cancelled, CANCELLATION_REASONS)
        self.out_of_memory_splits = Counter(
            "diffusion_worker_out_of_memory_splits",
            "Batches that ran out of device memory and were retried as two smaller batches.",
            registry=self.registry,
        )
        self.isolated_batch_retries = Counter(
            "diffusion_worker_isolated_batch_retries",
            "Batches of several requests whose pipeline call failed (not out of memory) and were "
            "retried one request at a time, so only a request at fault fails.",
            registry=self.registry,
        )
        self.expired_images_removed = Counter(
            "diffusion_worker_expired_images_removed",
            "Images removed from the worker's default local storage because their URL had expired.",
            registry=self.registry,
        )
        self.failed = Counter(
            "diffusion_worker_failed_requests",
            "Requests that failed, by reason: out_of_memory, pipeline_error (the pipeline call raised), "
            "moderation_blocked (the model's safety checker flagged an image), "
            "storage, internal_error (any other exception), shutdown (drain time ran out), device_failed "
            "(queued when the last engine left rotation).",
            ["reason"],
            registry=self.registry,
        )
        with_series(self.failed, FAILURE_REASONS)

        self.engines_in_rotation = Gauge(
            "diffusion_worker_engines_in_rotation",
            "Engines (pipeline copies) still taking batches; one leaves after failing several calls in a "
            "row, and at 0 the worker answers 503 device_failed and its probes fail.",
            registry=self.registry,
        )

    def watch_devices(self, devices: list[str]) -> None:
        """Expose torch's CUDA allocator figures for the CUDA ones among `devices` (none on a CPU)."""
        cuda = sorted({device for device in devices if device.startswith("cuda")})
        if cuda:
            self.registry.register(DeviceMemoryCollector(cuda))


def with_series(counter: Counter, reasons: tuple[str, ...]) -> None:
    """Create `counter`'s series for each of `reasons`, at 0."""
    for reason in reasons:
        counter.labels(reason=reason)


class DeviceMemoryCollector:
    """Read at each scrape: bytes in tensors (allocated), held from the driver by torch's caching
    allocator (reserved), and the allocated peak since start. Reserved well above allocated means
    fragmentation; the peak against the card's memory says how much room --max-batch-size has."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        family = GaugeMetricFamily(
            "diffusion_worker_device_memory_bytes",
            "torch CUDA allocator memory by device and kind (allocated, reserved, peak_allocated).",
            labels=["device", "kind"],
        )
        for device in self.devices:
            family.add_metric([device, "allocated"], torch.cuda.memory_allocated(device))
            family.add_metric([device, "reserved"], torch.cuda.memory_reserved(device))
            family.add_metric([device, "peak_allocated"], torch.cuda.max_memory_allocated(device))
        yield family
