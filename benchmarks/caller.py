"""Callers: load generators that drive taskd over JSON-RPC, one scenario per subcommand.

    python -m benchmarks.caller p2 --url ws://... --token K:S --agents agents.txt --tasks 20000
    python -m benchmarks.caller p3 --url ws://... --token K:S --agent UUID --calls 2000
    python -m benchmarks.caller p5 --url http://... --token K:S --agent UUID --calls 500
    python -m benchmarks.caller ws --url ws://... --seconds 5    # pipelined server_hello (or echo)

Each prints one JSON object with its measurements on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from benchmarks.stats import latency_report, percentile


def read_words(path: str) -> list[str]:
    """The whitespace-separated words of a file (agent UUIDs, one a line)."""
    return Path(path).read_text().split()


class Conn:
    """A pipelining JSON-RPC client on one WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = orjson.loads(message)
            for item in data if isinstance(data, list) else [data]:
                future = self.pending.pop(item.get("id"), None)
                if future is not None:
                    future.set_result(item)

    async def call(self, method: str, params: list[Any]) -> Any:
        request_id = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self.ws.send(
            orjson.dumps(
                {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
            ).decode()
        )
        reply = await future
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["result"]


async def connect(url: str) -> Conn:
    ws = await websockets.connect(
        url, max_size=None, ping_interval=None, compression=None, proxy=None
    )
    return Conn(ws)


async def p2(args: argparse.Namespace) -> dict[str, Any]:
    """Pipelined task_create_task over WebSockets until every result is stored."""
    agents = read_words(args.agents)
    conns = [await connect(args.url) for _ in range(args.connections)]
    task_type = orjson.loads(args.task)
    per_conn = args.tasks // len(conns)
    targets = itertools.cycle(agents)
    create_latency: list[float] = []

    async def worker(conn: Conn) -> None:
        window = asyncio.Semaphore(args.window)

        async def one(agent: str) -> None:
            started = time.perf_counter()
            try:
                await conn.call("task_create_task", [args.token, agent, task_type])
                create_latency.append(time.perf_counter() - started)
            finally:
                window.release()

        jobs = []
        for _ in range(per_conn):
            await window.acquire()
            jobs.append(asyncio.create_task(one(next(targets))))
        await asyncio.gather(*jobs)

    watcher = conns[0]
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    created = time.perf_counter()
    while True:
        running = await watcher.call(
            "task_query_task", [args.token, {"condition": ["is_running", "last"]}]
        )
        if not running:
            break
        await asyncio.sleep(0.02)
    finished = time.perf_counter()
    total = per_conn * len(conns)
    return {
        "tasks": total,
        "seconds": finished - started,
        "tasks_per_s": total / (finished - started),
        "create_phase_s": created - started,
        "create_p50_ms": percentile(create_latency, 50) * 1000,
        "create_p99_ms": percentile(create_latency, 99) * 1000,
    }


async def p3(args: argparse.Namespace) -> dict[str, Any]:
    """Sequential task_create_task_blocking round trips."""
    conn = await connect(args.url)
    task_type = orjson.loads(args.task)
    latencies = []
    for i in range(args.calls + args.warmup):
        started = time.perf_counter()
        result = await conn.call(
            "task_create_task_blocking", [args.token, args.agent, task_type, 5000]
        )
        elapsed = time.perf_counter() - started
        assert result["success"], result
        if i >= args.warmup:
            latencies.append(elapsed)
    return latency_report(latencies)


async def p5(args: argparse.Namespace) -> dict[str, Any]:
    """task_query_task for the newest 100 of one agent and type, over HTTP keep-alive."""
    latencies = []
    body = {
        "jsonrpc": "2.0",
        "method": "task_query_task",
        "params": [
            args.token,
            {"condition": [{"uuid": args.agent}, {"type": args.type}, {"limit": 100}]},
        ],
        "id": 1,
    }
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as client:
        for i in range(args.calls + args.warmup):
            started = time.perf_counter()
            reply = (await client.post("/", content=orjson.dumps(body))).json()
            elapsed = time.perf_counter() - started
            assert len(reply["result"]) == 100, reply
            if i >= args.warmup:
                latencies.append(elapsed)
    return latency_report(latencies)


async def ws_rate(args: argparse.Namespace) -> dict[str, Any]:
    """Pipelined requests over WebSockets for a fixed time; any reply carrying the id counts.

    The same frames go to taskd (``server_hello``) and to the echo floor, which
    sends each one back: both answers carry the request's id. At the end each
    connection stops sending and waits for its outstanding replies before it
    closes, as a well-behaved client does.
    """
    frame = orjson.loads(args.body)
    done = [0]
    recording = asyncio.Event()
    stopping = asyncio.Event()

    async def one_connection() -> None:
        ws = await websockets.connect(
            args.url, max_size=None, ping_interval=None, compression=None, proxy=None
        )
        ids = itertools.count(1)
        window = asyncio.Semaphore(args.window)

        async def reader() -> None:
            async for message in ws:
                data = orjson.loads(message)
                for item in data if isinstance(data, list) else [data]:
                    if "id" in item:
                        window.release()
                        if recording.is_set():
                            done[0] += 1

        reading = asyncio.create_task(reader())
        try:
            while not stopping.is_set():
                await window.acquire()
                frame["id"] = next(ids)
                await ws.send(orjson.dumps(frame).decode())
            for _ in range(args.window):  # every reply is in once the whole window is free
                await window.acquire()
        finally:
            reading.cancel()
            await ws.close()

    senders = [asyncio.create_task(one_connection()) for _ in range(args.connections)]
    await asyncio.sleep(args.warmup)
    recording.set()
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    recording.clear()
    elapsed = time.perf_counter() - started
    stopping.set()
    await asyncio.wait_for(asyncio.gather(*senders), 30)
    return {
        "messages": done[0],
        "seconds": elapsed,
        "messages_per_s": done[0] / elapsed,
        "connections": args.connections,
        "window": args.window,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", required=True)
    server.add_argument("--token", required=True)
    a = sub.add_parser("p2", parents=[server])
    a.add_argument("--agents", required=True)
    a.add_argument("--tasks", type=int, default=20000)
    a.add_argument("--connections", type=int, default=4)
    a.add_argument("--window", type=int, default=256)
    a.add_argument("--task", default='"version"')
    b = sub.add_parser("p3", parents=[server])
    b.add_argument("--agent", required=True)
    b.add_argument("--calls", type=int, default=2000)
    b.add_argument("--warmup", type=int, default=100)
    b.add_argument("--task", default='"version"', help="the task type as JSON")
    c = sub.add_parser("p5", parents=[server])
    c.add_argument("--agent", required=True)
    c.add_argument("--type", default="ping")
    c.add_argument("--calls", type=int, default=500)
    c.add_argument("--warmup", type=int, default=20)
    d = sub.add_parser("ws")
    d.add_argument("--url", required=True)
    d.add_argument("--body", default='{"jsonrpc": "2.0", "method": "server_hello", "id": 1}')
    d.add_argument("--connections", type=int, default=4)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args()
    result = await {"p2": p2, "p3": p3, "p5": p5, "ws": ws_rate}[args.scenario](args)
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
