"""The peer: Celery with the Redis broker and result backend, a no-op task on a per-host queue.

This is how Python users run "a task on host X" today: one queue per host
(``host-1``), a worker on that host consuming it, results in Redis.

    celery -A benchmarks.celery_app worker -Q host-1 -P prefork -c 2   # the worker
    python -m benchmarks.celery_app throughput --tasks 20000            # sent, then all fetched
    python -m benchmarks.celery_app latency --calls 1000                # apply_async().get()
    python -m benchmarks.celery_app flush                               # empty our Redis db only

``TASKD_BENCH_REDIS`` picks the Redis database (default ``redis://127.0.0.1:6379/9``).
Each client command prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.result import ResultSet  # type: ignore[import-untyped]

REDIS_URL = os.environ.get("TASKD_BENCH_REDIS", "redis://127.0.0.1:6379/9")
QUEUE = "host-1"

app = Celery("taskd_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_routes={"noop": {"queue": QUEUE}},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=64,
)


@app.task(name="noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Do nothing: what is measured is the queueing, not the work."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def throughput(tasks: int, timeout: float) -> dict[str, Any]:
    """Send ``tasks`` no-ops on one producer, then fetch every result."""
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        results = [noop.apply_async(producer=producer) for _ in range(tasks)]
    sent = time.perf_counter()
    values = ResultSet(results).join_native(timeout=timeout)
    finished = time.perf_counter()
    if len(values) != tasks:
        raise SystemExit(f"fetched {len(values)} results of {tasks}")
    return {
        "tasks": tasks,
        "seconds": finished - started,
        "tasks_per_s": tasks / (finished - started),
        "send_phase_s": sent - started,
    }


def latency(calls: int, warmup: int, timeout: float) -> dict[str, Any]:
    """Sequential ``apply_async().get()`` round trips."""
    latencies = []
    for i in range(calls + warmup):
        started = time.perf_counter()
        noop.apply_async().get(timeout=timeout)
        elapsed = time.perf_counter() - started
        if i >= warmup:
            latencies.append(elapsed)
    return {
        "calls": len(latencies),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


def wait_for_worker(timeout: float) -> dict[str, Any]:
    """Block until a worker consuming our queue answers a no-op."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            noop.apply_async().get(timeout=1)
            return {"ready": True}
        except Exception:
            if time.monotonic() > deadline:
                raise
            # TimeoutError from .get or a broker still starting: try again


def flush() -> dict[str, Any]:
    """Empty the benchmark's Redis database (and no other)."""
    with app.connection_for_write() as connection:
        connection.default_channel.client.flushdb()
    return {"flushed": REDIS_URL}


def main() -> None:
    """Command line: one client measurement, printed as JSON."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--tasks", type=int, default=20000)
    a.add_argument("--timeout", type=float, default=300)
    b = sub.add_parser("latency")
    b.add_argument("--calls", type=int, default=1000)
    b.add_argument("--warmup", type=int, default=50)
    b.add_argument("--timeout", type=float, default=30)
    c = sub.add_parser("wait")
    c.add_argument("--timeout", type=float, default=60)
    sub.add_parser("flush")
    args = parser.parse_args()
    if args.command == "throughput":
        report = throughput(args.tasks, args.timeout)
    elif args.command == "latency":
        report = latency(args.calls, args.warmup, args.timeout)
    elif args.command == "wait":
        report = wait_for_worker(args.timeout)
    else:
        report = flush()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
