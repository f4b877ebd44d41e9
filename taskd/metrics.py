"""Prometheus metrics of one server process, served at ``GET /metrics``.

Each process owns its own registry (several apps can live in one test
process); gauges are read at scrape time, so the hot paths only bump counters.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

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
        self.alert_events = Counter(
            "taskd_alert_events",
            "Alert events by what happened (started, reminded, resolved)",
            ["change"],
            registry=r,
        )
        self.alert_notifications = Counter(
            "taskd_alert_notifications",
            "Alert notifications by outcome (sent, retried, failed: given up)",
            ["outcome"],
            registry=r,
        )
        self.alert_messages = Counter(
            "taskd_alert_messages",
            "Messages handed to alert channels (one may carry many notifications), by outcome",
            ["outcome"],
            registry=r,
        )
        self.write_batch = Histogram(
            "taskd_store_write_batch_ops",
            "Operations committed per database transaction of the writer",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.admission_admitted = Counter(
            "taskd_admission_admitted",
            "Agent WebSocket handshakes admitted by admission control",
            registry=r,
        )
        self.admission_refused = Counter(
            "taskd_admission_refused",
            "Agent WebSocket handshakes refused with 503 and a retry hint, by reason",
            ["reason"],
            registry=r,
        )
        self.admission_abandoned = Counter(
            "taskd_admission_abandoned",
            "Agent WebSocket handshakes admitted whose agent left before it subscribed",
            registry=r,
        )
        self.admission_gone = Counter(
            "taskd_admission_gone",
            "WebSocket handshakes dropped unanswered: their client had closed while they"
            " waited in the kernel's accept queue",
            registry=r,
        )
        self.reports_shed = Counter(
            "taskd_reports_shed",
            "Agent reports answered 'server busy' as they were read, stored nothing: their"
            " connection already had its window of calls in progress",
            registry=r,
        )
        self.admission_deferred = Counter(
            "taskd_admission_deferred_reports",
            "Buffered agent reports answered 'server busy' with a retry hint (kept by the agent)",
            registry=r,
        )

    @contextlib.contextmanager
    def watching_gc(self) -> Iterator[None]:
        """Time the cycle collector's pauses (each one stops the event loop) while the
        block runs: ``taskd_gc_pause_seconds{generation}``."""
        pauses = Histogram(
            "taskd_gc_pause_seconds",
            "Pauses of the process's cycle collector (the event loop stops), by generation",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        started = 0.0

        def timed(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                pauses.labels(str(info["generation"])).observe(time.perf_counter() - started)

        gc.callbacks.append(timed)
        try:
            yield
        finally:
            gc.callbacks.remove(timed)
            self.registry.unregister(pauses)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
