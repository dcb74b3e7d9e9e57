"""Prometheus metrics of the service, on a registry of their own (one per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kdiff_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.queue_depth = Gauge("kdiff_queue_depth", "jobs waiting for admission", ["model"], registry=r)
        self.running = Gauge("kdiff_running_jobs", "jobs being sampled", ["model"], registry=r)
        self.rows = Histogram(
            "kdiff_batch_rows", "rows per model call", ["model"], buckets=_ROWS_BUCKETS, registry=r
        )
        self.network_rows = Histogram(
            "kdiff_network_call_rows",
            "rows per call of the network as run (batch-invariant chunks or wide calls, padded)",
            ["model"],
            buckets=_ROWS_BUCKETS,
            registry=r,
        )
        self.call_seconds = Histogram(
            "kdiff_model_call_seconds", "seconds per model call", ["model"], buckets=_SECONDS, registry=r
        )
        self.job_seconds = Histogram(
            "kdiff_job_phase_seconds",
            "job latency by phase (queue, run, encode, total)",
            ["model", "phase"],
            buckets=_SECONDS,
            registry=r,
        )
        self.jobs = Counter("kdiff_jobs", "finished jobs by outcome", ["model", "status"], registry=r)
        self.nfe = Counter("kdiff_nfe", "denoiser rows evaluated (NFE x images)", ["model"], registry=r)
        self.webhook_attempts = Counter(
            "kdiff_webhook_attempts",
            "webhook attempts by outcome (delivered, retry: to be tried again, failed: given up)",
            ["outcome"],
            registry=r,
        )
        self.nfe_rate = Gauge(
            "kdiff_nfe_per_second", "denoiser rows per second over the last window", ["model"], registry=r
        )
        self._window: dict[str, tuple[float, int]] = {}

    def observe_call(self, model: str, rows: int, seconds: float) -> None:
        self.rows.labels(model).observe(rows)
        self.call_seconds.labels(model).observe(seconds)
        self.nfe.labels(model).inc(rows)
        now = time.monotonic()
        start, count = self._window.get(model, (now, 0))
        count += rows
        if now - start >= 5.0:
            self.nfe_rate.labels(model).set(count / (now - start))
            start, count = now, 0
        self._window[model] = (start, count)

    def observe_job(self, model: str, status: str, timings: dict[str, float | None]) -> None:
        self.jobs.labels(model, status).inc()
        for phase in ("queue", "run", "encode", "total"):
            value = timings.get(f"{phase}_s")
            if value is not None:
                self.job_seconds.labels(model, phase).observe(value)
