"""A normal client, timed while the server is under attack: its own process, its own address.

    python -m benchmarks.faults_probe --url http://127.0.0.1:P/ --token K:S --agent UUID \
        --out probe.json [--local-address 127.0.0.2]

It alternates blocking round trips (``task_create_task_blocking`` of a
``version`` task to a load agent) and ``task_query_task`` calls, back to back
with a short pause, prints "ready" after its first good round trip, and on
SIGTERM writes every call (method, seconds since start, latency, outcome) to
``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

PAUSE_S = 0.05
CALL_TIMEOUT_S = 30.0


async def probe(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Call until SIGTERM; every call's record."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    transport = httpx.AsyncHTTPTransport(local_address=args.local_address)
    calls: list[dict[str, Any]] = []
    started = time.monotonic()
    calls_made = 0
    async with httpx.AsyncClient(
        base_url=args.url, timeout=CALL_TIMEOUT_S, transport=transport
    ) as http:
        while not stop.is_set():
            calls_made += 1
            if calls_made % 2:
                method = "task_create_task_blocking"
                params: list[Any] = [args.token, args.agent, "version", 10_000]
            else:
                method = "task_query_task"
                params = [args.token, {"condition": [{"limit": 10}]}]
            body = {"jsonrpc": "2.0", "method": method, "params": params, "id": calls_made}
            sent = time.monotonic()
            outcome = "ok"
            try:
                reply = orjson.loads((await http.post("/", content=orjson.dumps(body))).content)
                if "error" in reply:
                    outcome = f"error {reply['error'].get('code')}"
            except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
                outcome = type(exc).__name__
            took = time.monotonic() - sent
            calls.append(
                {"method": method, "at": sent - started, "latency": took, "outcome": outcome}
            )
            if calls_made == 1:
                print("ready", flush=True)
            await asyncio.sleep(PAUSE_S)
    return calls


def main() -> None:
    """Run the probe and write its calls."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local-address")
    args = parser.parse_args()
    calls = asyncio.run(probe(args))
    Path(args.out).write_bytes(orjson.dumps({"calls": calls}))


if __name__ == "__main__":
    main()
