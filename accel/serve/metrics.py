"""The server's Prometheus metrics, in a registry of their own (one per server, no global state)."""

from __future__ import annotations

from typing import Any

#: Request phases timed per request: waiting in the queue, the denoising loop, the VAE decode.
PHASES = ("queue", "loop", "decode")
#: Why a request failed: bad input, a full queue, the server warming up or shutting down, a client gone
#: before its batch started, or the worker group failing.
ERROR_KINDS = ("invalid", "queue_full", "warming_up", "shutting_down", "disconnected", "worker")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServeMetrics:
    """Counters, gauges and histograms of one server (``render()`` gives the /metrics text)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "accel_serve_requests", "Image requests answered, by HTTP status.", ["status"], registry=r
        )
        self.errors = Counter(
            "accel_serve_errors",
            "Requests that failed, by kind (" + ", ".join(ERROR_KINDS) + ").",
            ["kind"],
            registry=r,
        )
        self.queue_depth = Gauge("accel_serve_queue_depth", "Requests waiting for a batch.", registry=r)
        self.images = Counter("accel_serve_images", "Images generated.", registry=r)
        self.batch_images = Histogram(
            "accel_serve_batch_images",
            "Images per pipeline call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.phase_seconds = Histogram(
            "accel_serve_phase_seconds",
            "Seconds per request in each phase (queue, loop, decode).",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "accel_serve_request_seconds",
            "Seconds from arrival to response.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("accel_serve_ready", "1 once warm and accepting requests.", registry=r)
        # Every series exists from the start (at zero), so dashboards and alerts see them before any traffic.
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)

    def observe_phases(self, timings: dict[str, float]) -> None:
        """Record one request's phase timings."""
        for phase in PHASES:
            if phase in timings:
                self.phase_seconds.labels(phase=phase).observe(timings[phase])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        data: Any = generate_latest(self.registry)
        return data, CONTENT_TYPE_LATEST
