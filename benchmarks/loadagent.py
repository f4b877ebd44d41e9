"""A load agent: many agent subscriptions over real WebSockets in one process.

Each subscription answers every pushed task at once with a valid result of
its type. Uploads from one connection are sent as they are produced; with
``--batch`` the answers that arrive together go out as one JSON-RPC batch.

    python -m benchmarks.loadagent --url ws://127.0.0.1:2211/ --token K:S --count 100 \
        --uuid-file agents.txt [--batch]

Prints "ready N" on stdout once every subscription is registered.

With ``--reconnect`` each subscription reconnects like the real agent (the
agent's own backoff: 1 s doubling to 60 s, ±20% jitter) instead of ending the
process, and with ``--stats FILE`` a SIGUSR1 writes every agent's connection
attempts and subscriptions (wall-clock seconds) and the process's CPU time there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import resource
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

from taskd.agent.client import backoff_delays

RESULTS: dict[str, Any] = {
    "ping": {"ping": 0.5},
    "tcp_ping": {"tcp_ping": 0.5},
    "http_ping": {"http_ping": 0.5},
    "http_request": {"http_request": {"status": 200, "headers": [], "body": ""}},
    "dns": {"dns": [{"record_type": "a", "time": 0.5, "data": "127.0.0.1"}]},
    "web_shell": {"web_shell": True},
    "execute": {"execute": "(No Output)"},
    "read_config": {"read_config": ""},
    "edit_config": {"edit_config": True},
    "ip": {"ip": ["127.0.0.1", None]},
    "version": {"version": {"taskd": "load"}},
    "self_update": {"self_update": False},
}


def _kind(task_event_type: Any) -> str:
    return task_event_type if isinstance(task_event_type, str) else next(iter(task_event_type))


class SubscribeRefused(SystemExit):
    """The server refused a subscription: the process ends, unless the agent reconnects."""


@dataclass
class Connections:
    """One agent's connection attempts and subscriptions, wall-clock seconds."""

    attempts: list[float] = field(default_factory=list)
    subscribed: list[float] = field(default_factory=list)


async def agent(
    url: str,
    token: str,
    agent_uuid: str,
    batch: bool,
    ready: asyncio.Event,
    counter: list[int],
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """One subscription answering its tasks until cancelled (or the connection ends)."""
    ids = itertools.count(2)
    async with websockets.connect(
        url, max_size=None, ping_interval=None, compression=None, proxy=None
    ) as ws:
        await ws.send(
            orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "task_register_task",
                    "params": [token, agent_uuid],
                    "id": 1,
                }
            ).decode()
        )
        reply = orjson.loads(await ws.recv())
        if "error" in reply:
            raise SubscribeRefused(f"subscribe failed: {reply['error']}")
        counter[0] += 1
        ready.set()
        if on_subscribed is not None:
            on_subscribed()
        pending: list[bytes] = []
        in_flight: set[asyncio.Future[None]] = set()
        async for message in ws:
            data = orjson.loads(message)
            # replies to our uploads (a list when they went as a batch) need no answer
            if isinstance(data, list) or data.get("method") != "task_register_task":
                continue
            task = data["params"]["result"]
            upload = {
                "jsonrpc": "2.0",
                "method": "task_upload_task_result",
                "params": [
                    token,
                    {
                        "task_id": task["task_id"],
                        "agent_uuid": agent_uuid,
                        "task_token": task["task_token"],
                        "timestamp": time.time_ns() // 1_000_000,
                        "success": True,
                        "task_event_result": RESULTS[_kind(task["task_event_type"])],
                    },
                ],
                "id": next(ids),
            }
            if not batch:
                await ws.send(orjson.dumps(upload).decode())
                continue
            pending.append(orjson.dumps(upload))
            if len(pending) == 1:

                async def flush() -> None:
                    await asyncio.sleep(0)
                    body = b"[" + b",".join(pending) + b"]"
                    pending.clear()
                    await ws.send(body.decode())

                flushing = asyncio.ensure_future(flush())
                in_flight.add(flushing)
                flushing.add_done_callback(in_flight.discard)


async def reconnecting(
    url: str,
    token: str,
    agent_uuid: str,
    batch: bool,
    ready: asyncio.Event,
    counter: list[int],
    record: Connections,
    open_timeout: float,
) -> None:
    """One subscription that reconnects with the real agent's backoff until cancelled."""
    delays = backoff_delays()
    while True:
        record.attempts.append(time.time())
        before = len(record.subscribed)
        with contextlib.suppress(
            OSError, TimeoutError, websockets.WebSocketException, SubscribeRefused
        ):
            async with asyncio.timeout(open_timeout) as limit:
                await agent(url, token, agent_uuid, batch, ready, counter, _standing(record, limit))
        if len(record.subscribed) > before:
            delays = backoff_delays()  # it worked: start the backoff afresh, as the agent does
        await asyncio.sleep(next(delays))


def _standing(record: Connections, limit: asyncio.Timeout) -> Callable[[], None]:
    """Note a subscription; from then on the connection is served without a time limit."""

    def subscribed() -> None:
        record.subscribed.append(time.time())
        limit.reschedule(None)

    return subscribed


def write_stats(path: str, records: dict[str, Connections]) -> None:
    """Write every agent's attempts and subscriptions and this process's CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    data = {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "agents": {
            u: {"attempts": r.attempts, "subscribed": r.subscribed} for u, r in records.items()
        },
    }
    temp = f"{path}.tmp"
    Path(temp).write_bytes(orjson.dumps(data))
    os.replace(temp, path)


def options() -> tuple[argparse.Namespace, list[str]]:
    """The command line, and the agent UUIDs (read, or generated and written)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--uuid-file", help="write the agent UUIDs here, one per line")
    parser.add_argument("--uuids", help="read agent UUIDs from this file instead of generating")
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument("--reconnect", action="store_true", help="reconnect like the real agent")
    parser.add_argument("--open-timeout", type=float, default=10.0, help="--reconnect: seconds")
    parser.add_argument("--stats", help="--reconnect: on SIGUSR1 write connection stats here")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.uuids:
        uuids = Path(args.uuids).read_text().split()[: args.count]
    else:
        uuids = [str(uuid.uuid4()) for _ in range(args.count)]
    if args.uuid_file:
        Path(args.uuid_file).write_text("\n".join(uuids) + "\n")
    return args, uuids


async def main(args: argparse.Namespace, uuids: list[str]) -> None:
    """Hold every subscription; say "ready N" once all are registered."""
    counter = [0]
    gate = asyncio.Semaphore(args.connect_concurrency)
    tasks = []
    records = {u: Connections() for u in uuids} if args.reconnect else {}
    if args.stats:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, write_stats, args.stats, records
        )

    async def start(agent_uuid: str) -> None:
        ready = asyncio.Event()
        async with gate:
            if args.reconnect:
                session = reconnecting(
                    args.url,
                    args.token,
                    agent_uuid,
                    args.batch,
                    ready,
                    counter,
                    records[agent_uuid],
                    args.open_timeout,
                )
            else:
                session = agent(args.url, args.token, agent_uuid, args.batch, ready, counter)
            task = asyncio.create_task(session)
            tasks.append(task)
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()

    await asyncio.gather(*(start(u) for u in uuids))
    print(f"ready {counter[0]}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    arguments, agent_uuids = options()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(main(arguments, agent_uuids))
        except ImportError:
            asyncio.run(main(arguments, agent_uuids))
    sys.exit(0)
