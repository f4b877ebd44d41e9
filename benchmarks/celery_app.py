"""The peer: Celery with the Redis broker and result backend, a no-op task on a per-host queue.

This is how Python users run "a task on host X" today: one queue per host
(``host-1``), a worker on that host consuming it, results in Redis.

    celery -A benchmarks.celery_app worker -Q host-1 -P prefork -c 2   # the worker
    python -m benchmarks.celery_app throughput --tasks 20000 --producers 4
    python -m benchmarks.celery_app latency --calls 1000                # apply_async().get()
    python -m benchmarks.celery_app flush                               # empty our Redis db only

``throughput`` splits the tasks over ``--producers`` processes (as many as
taskd's benchmark has callers): each connects, says "ready", and on "go" from
stdin sends its share and then fetches every one of its results. The rate is
all tasks over the time from the first send to the last result fetched.

``TASKD_BENCH_REDIS`` picks the Redis database (default ``redis://127.0.0.1:6379/9``).
Each client command prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.result import ResultSet  # type: ignore[import-untyped]

from benchmarks.stats import latency_report

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


def produce(tasks: int, timeout: float, wait_for_go: bool) -> dict[str, Any]:
    """One producer: connect, (say "ready" and wait for "go"), send ``tasks``, fetch them all."""
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()
        app.backend.client.ping()
        if wait_for_go:
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("no go")
        # time.monotonic is system-wide on Linux: the producers' clocks compare
        started = time.monotonic()
        results = [noop.apply_async(producer=producer) for _ in range(tasks)]
    sent = time.monotonic()
    values = ResultSet(results).join_native(timeout=timeout)
    finished = time.monotonic()
    if len(values) != tasks:
        raise SystemExit(f"fetched {len(values)} results of {tasks}")
    return {"tasks": tasks, "started": started, "sent": sent, "finished": finished}


def throughput(tasks: int, timeout: float, producers: int) -> dict[str, Any]:
    """``tasks`` no-ops over ``producers`` processes started together; every result fetched."""
    if producers == 1:
        reports = [produce(tasks, timeout, wait_for_go=False)]
    else:
        shares = [tasks // producers + (i < tasks % producers) for i in range(producers)]
        argv = [sys.executable, "-m", "benchmarks.celery_app", "produce", "--timeout", str(timeout)]
        procs = [
            subprocess.Popen(
                [*argv, "--tasks", str(share)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            for share in shares
        ]
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise SystemExit(f"a producer failed to start (exit {proc.wait()})")
        for proc in procs:  # all connected: start them together
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            out = proc.stdout.read()
            if proc.wait() != 0:
                raise SystemExit(f"a producer failed (exit {proc.returncode})")
            reports.append(json.loads(out))
    started = min(r["started"] for r in reports)
    seconds = max(r["finished"] for r in reports) - started
    return {
        "tasks": sum(r["tasks"] for r in reports),
        "producers": producers,
        "seconds": seconds,
        "tasks_per_s": sum(r["tasks"] for r in reports) / seconds,
        "send_phase_s": max(r["sent"] for r in reports) - started,
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
    return latency_report(latencies)


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
    a.add_argument("--producers", type=int, default=1, help="producer processes")
    p = sub.add_parser("produce", help="one producer of throughput (reads go from stdin)")
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300)
    b = sub.add_parser("latency")
    b.add_argument("--calls", type=int, default=1000)
    b.add_argument("--warmup", type=int, default=50)
    b.add_argument("--timeout", type=float, default=30)
    c = sub.add_parser("wait")
    c.add_argument("--timeout", type=float, default=60)
    sub.add_parser("flush")
    args = parser.parse_args()
    if args.command == "throughput":
        report = throughput(args.tasks, args.timeout, args.producers)
    elif args.command == "produce":
        report = produce(args.tasks, args.timeout, wait_for_go=True)
    elif args.command == "latency":
        report = latency(args.calls, args.warmup, args.timeout)
    elif args.command == "wait":
        report = wait_for_worker(args.timeout)
    else:
        report = flush()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
