"""Alembic data migrations: rows stored under an older revision read back in the current form."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.helpers import make_settings, running_server

MIGRATIONS = Path(__file__).parent.parent / "taskd" / "migrations"
AGENT = str(uuid.uuid4())

# (type, task_event_type, result stored before 0005, result after 0005)
ROWS: list[tuple[str, Any, Any, Any]] = [
    ("tcp_ping", {"tcp_ping": "127.0.0.1:22"}, {"ping": 0.8}, {"tcp_ping": 0.8}),
    ("http_ping", {"http_ping": "http://h/"}, {"ping": 41}, {"http_ping": 41}),
    ("ping", {"ping": "127.0.0.1"}, {"ping": 12.5}, {"ping": 12.5}),
    ("tcp_ping", {"tcp_ping": "127.0.0.1:1"}, None, None),
    ("execute", {"execute": {"cmd": "ls", "args": []}}, {"execute": "x"}, {"execute": "x"}),
]


async def _alembic(engine: AsyncEngine, action: str, revision: str) -> None:
    """Run ``alembic upgrade|downgrade revision`` on the database."""

    def run(connection: Connection) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def _results(engine: AsyncEngine) -> list[Any]:
    """Every task's stored result, by id."""
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT task_event_result FROM task ORDER BY id"))
        return [json.loads(r) if isinstance(r, str) else r for (r,) in rows]


async def test_0005_moves_ping_like_results_to_their_own_variant(database_url: str) -> None:
    """tcp_ping/http_ping results stored as {"ping": x} read back as {"tcp_ping": x} and
    {"http_ping": x} after the upgrade (other rows untouched); a downgrade restores them."""
    engine = create_async_engine(database_url)
    try:
        await _alembic(engine, "upgrade", "0004")
        cast = "CAST(:result AS JSONB)" if engine.dialect.name == "postgresql" else ":result"
        cast_type = cast.replace(":result", ":task_type")
        async with engine.begin() as conn:
            for index, (kind, task, before, _) in enumerate(ROWS):
                await conn.execute(
                    text(
                        "INSERT INTO task (uuid, task_token, type, task_event_type, state,"
                        " created_at, deadline, order_ts, timestamp, success, task_event_result)"
                        f" VALUES (:uuid, :token, :kind, {cast_type}, 2, 1, 1, :ts, :ts, :ok,"
                        f" {cast})"
                    ),
                    {
                        "uuid": AGENT,
                        "token": f"tok{index:07d}",
                        "kind": kind,
                        "task_type": json.dumps(task),
                        "ts": 1000 + index,
                        "ok": before is not None,
                        "result": None if before is None else json.dumps(before),
                    },
                )
        async with running_server(make_settings(database_url)) as server:  # migrates to head
            records = await server.su("task_query_task", {"condition": [{"uuid": AGENT}]})
        assert [r["task_event_result"] for r in reversed(records)] == [r[3] for r in ROWS]

        await _alembic(engine, "downgrade", "0004")
        assert await _results(engine) == [r[2] for r in ROWS]
    finally:
        await engine.dispose()
