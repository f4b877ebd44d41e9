"""A load agent: many agent subscriptions over real WebSockets in one process.

Each subscription answers every pushed task at once with a valid result of
its type. Uploads from one connection are sent as they are produced; with
``--batch`` the answers that arrive together go out as one JSON-RPC batch.

    python -m benchmarks.loadagent --url ws://127.0.0.1:2211/ --token K:S --count 100 \
        --uuid-file agents.txt [--batch]

Prints "ready N" on stdout once every subscription is registered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import websockets

RESULTS: dict[str, Any] = {
    "ping": {"ping": 0.5},
    "tcp_ping": {"ping": 0.5},
    "http_ping": {"ping": 0.5},
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


async def agent(
    url: str, token: str, agent_uuid: str, batch: bool, ready: asyncio.Event, counter: list[int]
) -> None:
    """One subscription answering its tasks until cancelled."""
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
            raise SystemExit(f"subscribe failed: {reply['error']}")
        counter[0] += 1
        ready.set()
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

    async def start(agent_uuid: str) -> None:
        ready = asyncio.Event()
        async with gate:
            task = asyncio.create_task(
                agent(args.url, args.token, agent_uuid, args.batch, ready, counter)
            )
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
