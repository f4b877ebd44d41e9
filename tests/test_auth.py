"""The authenticator: token rows cached, made-up keys answered without the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event

from taskd.auth import Authenticator, NewToken, RateLimiter, hash_secret
from taskd.errors import PermissionDenied
from taskd.store import Store


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store over a fresh database."""
    async with Store(database_url, pool_size=2) as opened:
        await opened.migrate()
        yield opened


def _count_token_reads(store: Store) -> list[str]:
    reads: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM token" in statement:
            reads.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
    return reads


async def test_a_flood_with_one_made_up_key_reads_the_database_once(store: Store) -> None:
    """Thousands of calls with an unknown key cost one token lookup, and all are refused."""
    auth = Authenticator(store, RateLimiter(burst=1 << 30, rate_per_s=1e9))
    reads = _count_token_reads(store)
    outcomes = await asyncio.gather(
        *(auth.authenticate("NoSuchKey0000000:" + "s" * 32, "10.0.0.9") for _ in range(500)),
        return_exceptions=True,
    )
    for _ in range(500):
        with pytest.raises(PermissionDenied, match="unknown key or wrong secret"):
            await auth.authenticate("NoSuchKey0000000:" + "s" * 32, "10.0.0.9")
    assert all(isinstance(o, PermissionDenied) for o in outcomes)
    assert len(reads) == 1, reads


async def test_a_token_created_after_a_miss_works_at_once(store: Store) -> None:
    """A key remembered as unknown is looked up again once tokens change."""
    auth = Authenticator(store, RateLimiter(burst=1 << 30, rate_per_s=1e9))
    token = NewToken.generate()
    with pytest.raises(PermissionDenied):
        await auth.authenticate(str(token), "10.0.0.9")
    await store.insert_token(
        {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": []}
    )
    auth.invalidate(token.key)
    principal = await auth.authenticate(str(token), "10.0.0.9")
    assert principal.key == token.key and not principal.is_super
