"""Fill a SQLite database made by ``taskd init`` with completed tasks, fast.

Rows go straight into the file with ``sqlite3.executemany`` in the exact
schema ``taskd init`` created (read back from the file, so a new column
does not silently go missing): indexes are dropped first and rebuilt after,
which is how a bulk load is done without paying for index upkeep per row.

    python -m benchmarks.seed DB_FILE --rows 1000000 --agents 500
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.loadagent import RESULTS

TASKS: dict[str, Any] = {
    "ping": {"ping": "example.com"},
    "tcp_ping": {"tcp_ping": "example.com:443"},
    "http_ping": {"http_ping": "https://example.com/health"},
    "http_request": {
        "http_request": {"url": "https://example.com/", "method": "GET", "headers": {}}
    },
    "dns": {"dns": {"domain": "example.com", "record_types": ["a"]}},
    "web_shell": {
        "web_shell": {
            "url": "wss://example.com/auto_gen",
            "terminal_id": "3f0c0d9e-4a61-4bde-9df0-6f0ad5c0e6a1",
        }
    },
    "execute": {"execute": {"cmd": "uptime", "args": []}},
    "read_config": "read_config",
    "edit_config": {
        "edit_config": 'agent_uuid = "auto_gen"\n\n[[server]]\nname = "main"\n'
        'ws_url = "wss://taskd.example.com/"\ntoken = "KEY:SECRET"\n'
        'server_uuid = "0760cd7b-406f-4654-a028-437517072876"\n'
    },
    "ip": "ip",
    "version": "version",
    "self_update": {"self_update": "v1.2.3"},
}
TYPES = tuple(TASKS)
DAY_MS = 86_400_000


def agent_uuids(count: int) -> list[str]:
    """The seeded agents, the same for the same count."""
    rng = random.Random(count)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def _rows(rows: int, agents: list[str], now: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(7)
    letters = string.ascii_letters + string.digits
    task_json = {kind: json.dumps(value) for kind, value in TASKS.items()}
    result_json = {kind: json.dumps(RESULTS[kind]) for kind in TYPES}
    span = 30 * DAY_MS
    per_round = len(agents) * len(TYPES)
    for i in range(rows):
        # every (agent, type) pair gets the same share of rows
        agent = agents[i % len(agents)]
        kind = TYPES[(i // len(agents)) % len(TYPES)]
        # older rows first, so ids grow with time as they would in production
        timestamp = now - span + (i * span) // rows + rng.randrange(1000)
        created = timestamp - rng.randrange(5, 2000)
        failed = rng.random() < 0.05
        yield {
            "uuid": agent,
            "task_token": "".join(rng.choices(letters, k=10)),
            "type": kind,
            "task_event_type": task_json[kind],
            "state": 2,
            "created_at": created,
            "deadline": created + 600_000,
            "queue_ttl_ms": None,
            "order_ts": timestamp,
            "timestamp": timestamp,
            "success": 0 if failed else 1,
            "error_message": "Connection refused" if failed else None,
            "task_event_result": None if failed else result_json[kind],
            "cron_source": f"cron-{i % 7}" if i % per_round < len(agents) else None,
            "created_by": None,
        }


def seed(path: Path, rows: int, agents: int) -> dict[str, Any]:
    """Insert ``rows`` completed tasks spread over ``agents`` agents and all task types."""
    started = time.perf_counter()
    uuids = agent_uuids(agents)
    db = sqlite3.connect(path)
    try:
        columns = db.execute("PRAGMA table_info(task)").fetchall()
        names = [c[1] for c in columns if c[1] != "id"]
        required = {c[1] for c in columns if c[3] and c[4] is None and c[1] != "id"}
        sample = next(_rows(1, uuids, 0))
        missing = required - set(sample)
        if missing:
            raise SystemExit(f"task has required column(s) the seeder does not know: {missing}")
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'task'"
            " AND sql IS NOT NULL"
        ).fetchall()
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        for name, _ in indexes:
            db.execute(f'DROP INDEX "{name}"')
        statement = f"INSERT INTO task ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        now = int(time.time() * 1000)
        db.executemany(
            statement,
            (tuple(row.get(n) for n in names) for row in _rows(rows, uuids, now)),
        )
        db.commit()
        inserted = time.perf_counter()
        for _, sql in indexes:
            db.execute(sql)
        db.commit()
        db.execute("PRAGMA journal_mode=WAL")
        count = db.execute("SELECT count(*) FROM task").fetchone()[0]
    finally:
        db.close()
    finished = time.perf_counter()
    return {
        "rows": count,
        "agents": agents,
        "types": len(TYPES),
        "rows_per_agent_and_type": rows // (agents * len(TYPES)),
        "insert_s": inserted - started,
        "index_s": finished - inserted,
        "agent": uuids[0],
        "type": TYPES[0],
    }


def main() -> None:
    """Command line: seed and print one JSON object."""
    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(seed(args.db, args.rows, args.agents)), flush=True)


if __name__ == "__main__":
    main()
