"""The store's group-commit writer: a bad value fails only its own write, on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from taskd.auth import NewToken, hash_secret
from taskd.clock import now_ms
from taskd.errors import InvalidInput
from taskd.protocol import TaskResponse
from taskd.store import NewTask, Store


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over a fresh database."""
    async with Store(database_url, pool_size=2) as opened:
        await opened.migrate()
        yield opened


def _token(**fields: object) -> dict[str, object]:
    token = NewToken.generate()
    return {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": []} | fields


async def test_a_value_the_database_refuses_fails_only_its_own_write(store: Store) -> None:
    """Writes batched with one the database cannot store still commit; that one is 108."""
    good = [_token() for _ in range(3)]
    # beyond BIGINT on both databases: the driver or the server refuses it
    bad = _token(max_uses=1 << 64)
    outcomes = await asyncio.gather(
        *(store.insert_token(values) for values in (good[0], bad, *good[1:])),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], InvalidInput), outcomes[1]
    assert all(isinstance(o, int) for o in outcomes[:1] + outcomes[2:]), outcomes
    stored = {row.key for row in await store.list_tokens()}
    assert stored == {t["key"] for t in good}


async def test_nul_characters_in_results_are_stored(store: Store) -> None:
    """Output with NUL characters is stored (PostgreSQL text cannot hold NUL: it becomes U+FFFD)."""
    now = now_ms()
    agent = str(uuid.uuid4())
    rows = [
        NewTask(
            agent, f"tok{i:07d}", "execute", {"execute": {"cmd": "x", "args": []}}, now + 1, now
        )
        for i in range(2)
    ]
    await store.insert_tasks(rows)
    uploads = [
        TaskResponse.model_validate(
            {
                "task_id": rows[0].id,
                "agent_uuid": agent,
                "task_token": rows[0].task_token,
                "timestamp": now,
                "success": True,
                "task_event_result": {"execute": "a\x00b"},
            }
        ),
        TaskResponse.model_validate(
            {
                "task_id": rows[1].id,
                "agent_uuid": agent,
                "task_token": rows[1].task_token,
                "timestamp": now,
                "success": False,
                "error_message": "bad\x00thing",
            }
        ),
    ]
    await asyncio.gather(*(store.complete_task(u) for u in uploads))
    kept = "\x00" if store.is_sqlite else "\ufffd"
    first = await store.get_result(rows[0].id)
    second = await store.get_result(rows[1].id)
    assert first is not None and first.task_event_result == {"execute": f"a{kept}b"}
    assert second is not None and second.error_message == f"bad{kept}thing"


async def test_a_lookup_the_database_cannot_make_is_refused_not_a_database_error(
    store: Store,
) -> None:
    """Looking up a NUL-bearing name finds nothing (SQLite) or is 108 (PostgreSQL), never 103."""
    try:
        found = await store.cron_by_name("nul\x00name")
    except InvalidInput:
        assert not store.is_sqlite
    else:
        assert found is None and store.is_sqlite
    assert await store.cron_by_name("plain") is None


async def test_writes_commit_while_every_read_connection_is_taken(store: Store) -> None:
    """A flood of reads holding the whole pool never holds back a commit (PostgreSQL too)."""
    held = contextlib.AsyncExitStack()
    async with held:
        # pool_size=2 (+2 overflow on PostgreSQL): take every read connection there is
        for _ in range(2 if store.is_sqlite else 4):
            await held.enter_async_context(store.engine.connect())
        now = now_ms()
        task = NewTask(str(uuid.uuid4()), "tok0000001", "version", "version", now + 60_000, now)
        async with asyncio.timeout(5):
            [task_id] = await store.insert_tasks([task])
    assert (await store.task_identity(task_id)) is not None
