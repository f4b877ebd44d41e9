"""An HTTP/1.1 keep-alive load generator for when wrk is not installed.

Several worker processes, each holding its share of the connections on one
uvloop event loop with raw asyncio protocols: one POST in flight per
connection, the next one sent as soon as the previous response is complete
(wrk's closed loop). Responses are parsed just enough to find their end.

    python -m benchmarks.httpload --url http://127.0.0.1:2211/ --body '{"jsonrpc": ...}' \
        --connections 64 --duration 5 --processes 2

Prints one JSON object: requests, seconds, requests_per_s, errors, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from benchmarks.stats import percentile


class Stats:
    """Counters shared by the connections of one worker."""

    def __init__(self) -> None:
        self.recording = False
        self.running = True
        self.done = 0
        self.errors = 0
        self.latencies = array("d")


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request in a closed loop."""

    def __init__(self, request: bytes, stats: Stats, closed: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.closed = closed
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        start = head.find(b"content-length:")
        length = 0
        if start >= 0:
            line_end = head.find(b"\r\n", start)
            length = int(head[start + 15 : line_end if line_end >= 0 else None])
        if len(self.buffer) < end + 4 + length:
            return
        self.buffer = self.buffer[end + 4 + length :]
        stats = self.stats
        if stats.recording:
            if head[9:12] == b"200":
                stats.done += 1
                stats.latencies.append(time.perf_counter() - self.sent_at)
            else:
                stats.errors += 1
        if stats.running:
            self.send()
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stats.running:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def worker(url: str, body: bytes, connections: int, duration: float, warmup: float) -> Any:
    """Run ``connections`` closed-loop connections; count the responses after the warm-up."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    stats = Stats()
    closed: list[asyncio.Future[None]] = []
    for _ in range(connections):
        future: asyncio.Future[None] = loop.create_future()
        closed.append(future)
        await loop.create_connection(functools.partial(Client, request, stats, future), host, port)
    await asyncio.sleep(warmup)
    stats.recording = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    stats.recording = False
    elapsed = time.perf_counter() - started
    stats.running = False
    await asyncio.wait(closed, timeout=5)
    return {
        "requests": stats.done,
        "errors": stats.errors,
        "seconds": elapsed,
        # every k-th latency: percentiles stay exact enough, the report stays small
        "latencies_ms": [
            round(x * 1000, 3) for x in stats.latencies[:: max(1, len(stats.latencies) // 20000)]
        ],
    }


def run(
    url: str, body: bytes, connections: int, duration: float, processes: int, warmup: float
) -> dict[str, Any]:
    """Spread the connections over ``processes`` workers and add up what they measured."""
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    shares = [share for share in shares if share]
    with tempfile.TemporaryDirectory(prefix="httpload-") as directory:
        files = [Path(directory) / f"worker-{i}.json" for i in range(len(shares))]
        argv = [sys.executable, "-m", "benchmarks.httpload", "--worker", "--url", url]
        argv += ["--body", body.decode(), "--duration", str(duration), "--warmup", str(warmup)]
        workers = [
            subprocess.Popen([*argv, "--connections", str(share), "--report", str(path)])
            for share, path in zip(shares, files, strict=True)
        ]
        for process in workers:
            process.wait(timeout=duration + warmup + 60)
            if process.returncode != 0:
                raise SystemExit(f"an httpload worker exited with {process.returncode}")
        reports = [orjson.loads(path.read_bytes()) for path in files]
    latencies = [x for report in reports for x in report["latencies_ms"]]
    return {
        "generator": "httpload",
        "connections": connections,
        "processes": len(workers),
        "requests": sum(r["requests"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "seconds": max(r["seconds"] for r in reports),
        "requests_per_s": sum(r["requests"] / r["seconds"] for r in reports),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def main() -> None:
    """Command line: run the load and print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    body = args.body.encode()
    if args.worker:
        job = worker(args.url, body, args.connections, args.duration, args.warmup)
        try:
            import uvloop

            report = uvloop.run(job)
        except ImportError:
            report = asyncio.run(job)
        args.report.write_bytes(orjson.dumps(report))
        return
    report = run(args.url, body, args.connections, args.duration, args.processes, args.warmup)
    print(orjson.dumps(report).decode(), flush=True)


if __name__ == "__main__":
    main()
