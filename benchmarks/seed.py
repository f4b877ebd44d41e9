"""Fill a SQLite database made by ``taskd init`` with completed tasks, fast.

Rows go straight into the file with ``sqlite3.executemany`` in the exact
schema ``taskd init`` created (read back from the file, so a new column
does not silently go missing): indexes are dropped first and rebuilt after,
which is how a bulk load is done without paying for index upkeep per row.

Host monitoring (``monitoring_rows``): a fleet's recent summaries and one agent's
30 days at the default retention (raw summaries, 1-minute and 1-hour rollups), into
SQLite the same way (``seed_monitoring``) or into PostgreSQL with COPY
(``seed_monitoring_pg``).

    python -m benchmarks.seed DB_FILE --rows 1000000 --agents 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from benchmarks.loadagent import RESULTS
from taskd.config import ServerSettings
from taskd.models import (
    ROLLUP_FIGURES,
    summary_latest_t,
    summary_rollup_t,
    summary_t,
)
from taskd.store.monitoring import latest_rows

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
        now = time.time_ns() // 1_000_000
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


MINUTE_MS, HOUR_MS = 60_000, 3_600_000


def _summary(rng: random.Random, agent: str, time_ms: int) -> dict[str, Any]:
    """One plausible summary row (figures as stored: cpu and loads in tenths)."""
    total = 16 << 30
    return {
        "uuid": agent,
        "time": time_ms,
        "storage_time": time_ms + rng.randrange(5, 50),
        "cpu_usage": rng.randrange(0, 1000),
        "gpu_usage": None,
        "used_swap": rng.randrange(0, 1 << 30),
        "total_swap": 2 << 30,
        "used_memory": rng.randrange(total // 5, total * 4 // 5),
        "total_memory": total,
        "available_memory": rng.randrange(total // 5, total * 4 // 5),
        "load_one": rng.randrange(0, 400),
        "load_five": rng.randrange(0, 400),
        "load_fifteen": rng.randrange(0, 400),
        "uptime": 86_400 * 30 + time_ms // 1000 % 86_400,
        "boot_time": 1_700_000_000,
        "process_count": rng.randrange(80, 400),
        "total_space": 500 << 30,
        "available_space": rng.randrange(100 << 30, 400 << 30),
        "read_speed": rng.randrange(0, 50 << 20),
        "write_speed": rng.randrange(0, 50 << 20),
        "tcp_connections": rng.randrange(10, 2000),
        "udp_connections": rng.randrange(0, 50),
        "total_received": rng.randrange(1 << 30, 1 << 40),
        "total_transmitted": rng.randrange(1 << 30, 1 << 40),
        "transmit_speed": rng.randrange(0, 10 << 20),
        "receive_speed": rng.randrange(0, 10 << 20),
    }


def _rollup(rng: random.Random, agent: str, resolution: int, bucket: int) -> dict[str, Any]:
    """One plausible rollup bucket: a report a second for the whole bucket."""
    count = resolution // 1000
    row: dict[str, Any] = {"uuid": agent, "resolution": resolution, "bucket": bucket}
    low, high = _summary(rng, agent, bucket), _summary(rng, agent, bucket)
    for name in ROLLUP_FIGURES:
        a, b = low[name], high[name]
        if a is None:
            row.update({f"{name}_count": 0, f"{name}_sum": None})
            row.update({f"{name}_min": None, f"{name}_max": None})
            continue
        a, b = min(a, b), max(a, b)
        row.update({f"{name}_count": count, f"{name}_sum": float(count * (a + b) // 2)})
        row.update({f"{name}_min": a, f"{name}_max": b})
    return row


def monitoring_rows(
    agents: list[str], recent: int, now_ms: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summaries, rollups): ``recent`` one-second summaries of every agent up to ``now_ms``,
    and for ``agents[0]`` 30 days at the default retention: raw summaries for the raw
    retention, 1-minute rollups for theirs, 1-hour rollups for the 30 days."""
    rng = random.Random(13)
    kept = ServerSettings  # the defaults
    now_s = now_ms - now_ms % 1000
    first, others = agents[0], agents[1:]
    raw_s = max(recent, kept.monitoring_summary_retention_s)
    pool = [_summary(rng, first, 0) for _ in range(997)]  # figures drawn once, reused

    def at(agent: str, time_ms: int, n: int) -> dict[str, Any]:
        row = {**pool[n % len(pool)], "uuid": agent, "time": time_ms}
        row["storage_time"] = time_ms + 7
        return row

    summaries = [at(first, now_s - i * 1000, i) for i in range(raw_s)]
    summaries += [
        at(a, now_s - i * 1000, n * recent + i) for n, a in enumerate(others) for i in range(recent)
    ]
    rollups = []
    minute = now_ms - now_ms % MINUTE_MS
    for i in range(min(kept.monitoring_rollup_1m_retention_s, 30 * 86_400) // 60):
        rollups.append(_rollup(rng, first, MINUTE_MS, minute - i * MINUTE_MS))
    hour = now_ms - now_ms % HOUR_MS
    for i in range(30 * 24):
        rollups.append(_rollup(rng, first, HOUR_MS, hour - i * HOUR_MS))
    return summaries, rollups


SEEDED_TABLES = (
    (summary_t.name, summary_t),
    (summary_rollup_t.name, summary_rollup_t),
    (summary_latest_t.name, summary_latest_t),
)


def seed_monitoring(path: Path, agents: list[str], recent: int, now_ms: int) -> dict[str, Any]:
    """``monitoring_rows`` into a SQLite file made by ``taskd init`` (indexes rebuilt after)."""
    started = time.perf_counter()
    summaries, rollups = monitoring_rows(agents, recent, now_ms)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA synchronous=OFF")
        latest = latest_rows(summaries)
        for (name, table), rows in zip(SEEDED_TABLES, (summaries, rollups, latest), strict=True):
            names = [c.name for c in table.c]
            statement = (
                f"INSERT INTO {name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            )
            db.executemany(statement, (tuple(r[n] for n in names) for r in rows))
        db.commit()
        db.execute("ANALYZE")
        db.commit()
    finally:
        db.close()
    return {
        "summaries": len(summaries),
        "rollups": len(rollups),
        "seconds": time.perf_counter() - started,
    }


async def seed_monitoring_pg(
    dsn: str, agents: list[str], recent: int, now_ms: int
) -> dict[str, Any]:
    """``monitoring_rows`` into a PostgreSQL database made by ``taskd init``, with COPY."""
    started = time.perf_counter()
    summaries, rollups = monitoring_rows(agents, recent, now_ms)
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        latest = latest_rows(summaries)
        for (name, table), rows in zip(SEEDED_TABLES, (summaries, rollups, latest), strict=True):
            names = [c.name for c in table.c]
            records = [tuple(r[n] for n in names) for r in rows]
            await conn.copy_records_to_table(name, records=records, columns=names)
            await conn.execute(f"ANALYZE {name}")
    finally:
        await conn.close()
    return {
        "summaries": len(summaries),
        "rollups": len(rollups),
        "seconds": time.perf_counter() - started,
    }


def run_seed_monitoring_pg(dsn: str, agents: list[str], recent: int, now_ms: int) -> dict[str, Any]:
    """``seed_monitoring_pg`` from synchronous code."""
    return asyncio.run(seed_monitoring_pg(dsn, agents, recent, now_ms))


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
