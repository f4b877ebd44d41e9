"""Prometheus metrics of one server process, served at ``GET /metrics``.

Each process owns its own registry (several apps can live in one test
process); gauges are read at scrape time, so the hot paths only bump counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """The counters and gauges taskd exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks_created = Counter(
            "taskd_tasks_created",
            "Tasks created, by how they were handed over",
            ["route"],
            registry=r,
        )
        self.results_stored = Counter(
            "taskd_results_stored", "Results uploaded by agents and stored", ["success"], registry=r
        )
        self.tasks_reaped = Counter(
            "taskd_tasks_reaped", "Tasks failed by the server after their deadline", registry=r
        )
        self.rpc_errors = Counter(
            "taskd_rpc_errors", "JSON-RPC error replies, by code", ["code"], registry=r
        )
        self.auth_failures = Counter("taskd_auth_failures", "Failed authentications", registry=r)
        # the children the hot paths bump, looked up once (labels() takes a lock and a dict)
        self.tasks_pushed = self.tasks_created.labels("pushed")
        self.tasks_queued = self.tasks_created.labels("queued")
        self.results_succeeded = self.results_stored.labels("true")
        self.results_failed = self.results_stored.labels("false")
        self.write_batch = Histogram(
            "taskd_store_write_batch_ops",
            "Operations committed per database transaction of the writer",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
