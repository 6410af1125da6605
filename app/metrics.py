"""Prometheus metrics of one API process (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from store.jobs import JOB_STATES

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _JobsCollector(Collector):
    """``cama_adapt_jobs{state}``, read from the job store at scrape time (skipped if it is down)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("cama_adapt_jobs", "Adaptation jobs by state", labels=["state"])
        if self.source is not None:
            try:
                counts = self.source()
            except Exception as exc:
                log.debug("job counts unavailable: %s", exc)
                counts = {}
            for state in JOB_STATES:
                if state in counts:
                    family.add_metric([state], counts[state])
        yield family


class ServiceMetrics:
    """Request counts and latencies per route and model, in-flight requests, batch sizes, jobs, versions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cama_requests", "HTTP requests", ["route", "method", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "cama_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("cama_requests_in_flight", "HTTP requests being served", registry=r)
        self.batch_inputs = Histogram(
            "cama_batch_inputs", "Inputs per forward pass", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "cama_batch_requests", "Requests per forward pass", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.active_version = Gauge("cama_active_version", "Version served per model", ["model"], registry=r)
        self.swaps = Counter("cama_model_swaps", "Hot-swaps of a served version", ["model"], registry=r)
        self.load_failures = Counter(
            "cama_model_load_failures",
            "Versions refused at load (corrupt or unreadable)",
            ["model"],
            registry=r,
        )
        self.drift_statistic = Gauge(
            "cama_drift_statistic",
            "The drift test's z over the served version's last window of unusual scores",
            ["model"],
            registry=r,
        )
        self.drift_state = Gauge(
            "cama_drift_state", "Drift state per model: 0 warming, 1 normal, 2 drift", ["model"], registry=r
        )
        self.jobs = _JobsCollector()
        r.register(self.jobs)
