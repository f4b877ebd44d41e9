"""The authenticator: token rows cached, made-up keys answered without the database,
password logins kept off the event loop and alike for known and unknown usernames."""

from __future__ import annotations

import asyncio
import os
import statistics
import string
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event

from taskd.auth import (
    Authenticator,
    NewToken,
    RateLimiter,
    hash_password,
    hash_secret,
    random_string,
)
from taskd.errors import InvalidParams, PermissionDenied, SerializationError
from taskd.store import Store
from tests.helpers import scaled


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

    for engine in store.read_engines:
        event.listen(engine, "before_cursor_execute", seen)
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


async def test_a_credential_string_is_parsed_as_nodeget_does(store: Store) -> None:
    """Neither KEY:SECRET nor USERNAME|PASSWORD is a 101 parse error that reads nothing and
    uses up no failed-login allowance; a token that is no string is -32602."""
    auth = Authenticator(store, RateLimiter(burst=1, rate_per_s=1e-9))
    reads = _count_token_reads(store)
    for malformed in ("", "no-separator", "x" * 600):
        with pytest.raises(SerializationError) as error:
            await auth.authenticate(malformed, "10.0.0.9")
        assert error.value.code == 101
        assert error.value.wire_message == (
            "Parse error: Invalid token format: expected KEY:SECRET or USERNAME|PASSWORD"
        )
    for not_a_string in (None, 12345, ["k", "s"]):
        with pytest.raises(InvalidParams) as params_error:
            await auth.authenticate(not_a_string, "10.0.0.9")
        assert params_error.value.code == -32602
    assert reads == []
    with pytest.raises(PermissionDenied, match="unknown key or wrong secret"):
        await auth.authenticate("NoSuchKey0000000:" + "s" * 32, "10.0.0.9")
    with pytest.raises(PermissionDenied, match="Too many"):
        await auth.authenticate("NoSuchKey0000000:" + "s" * 32, "10.0.0.9")


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


async def _with_password(store: Store, username: str, password: str) -> None:
    token = NewToken.generate()
    await store.insert_token(
        {
            "key": token.key,
            "secret_hash": hash_secret(token.secret),
            "limits": [],
            "username": username,
            "password_hash": hash_password(password),
        }
    )


async def _failed_login(auth: Authenticator, username: str) -> float:
    """Seconds one refused password login takes."""
    started = time.perf_counter()
    with pytest.raises(PermissionDenied, match="unknown username or wrong password"):
        await auth.authenticate(f"{username}|a wrong password", "10.0.0.9")
    return time.perf_counter() - started


async def test_failed_password_logins_never_stall_the_event_loop(store: Store) -> None:
    """While dozens of password logins fail at once, the event loop is never held up for long."""
    auth = Authenticator(store, RateLimiter(burst=1 << 30, rate_per_s=1e9))
    await _with_password(store, "alice", "the right password")
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - started - 0.01)

    ticker = asyncio.create_task(tick())
    logins = [_failed_login(auth, name) for name in ("alice", "nobody", "mallory") * 8]
    await asyncio.gather(*logins)
    done.set()
    await ticker
    # scrypt on the loop would stall it for 50 ms or more per unknown username: over a
    # second here; a busy machine alone delays a few ticks by a few tens of ms
    stalled = sum(lag for lag in lags if lag > 0.02)
    assert len(lags) > 10 and stalled < scaled(0.5), sorted(lags)[-5:]


async def test_unknown_usernames_take_as_long_as_known_ones(store: Store) -> None:
    """A refused login costs the same whether or not the username exists."""
    auth = Authenticator(store, RateLimiter(burst=1 << 30, rate_per_s=1e9))
    await _with_password(store, "alice", "the right password")
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(7):
        known.append(await _failed_login(auth, "alice"))
        unknown.append(await _failed_login(auth, "nobody"))
    # an extra scrypt for unknown users would make this about 2
    ratio = statistics.median(unknown) / statistics.median(known)
    assert 0.6 < ratio < 1.5, (known, unknown)


def test_random_strings_are_alphanumeric_uniform_and_distinct() -> None:
    """Keys, secrets and task tokens: exact length, only A-Za-z0-9, every character about
    equally likely, never repeated."""
    drawn = [random_string(32) for _ in range(20_000)]
    assert len(set(drawn)) == len(drawn)
    assert all(len(s) == 32 and s.isascii() and s.isalnum() for s in drawn)
    counts = Counter("".join(drawn))
    assert set(counts) == set(string.ascii_letters + string.digits)
    expected = 32 * 20_000 / 62
    assert all(abs(n - expected) < 0.1 * expected for n in counts.values()), counts


def test_a_forked_child_draws_its_own_random_strings() -> None:
    """A child process never hands out the random bytes its parent already holds."""
    random_string(10)  # the parent holds a page of random bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, random_string(16).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != random_string(16)


async def test_a_verified_secret_still_refuses_every_other_secret(store: Store) -> None:
    """After a token authenticated once, a wrong, shorter or non-ASCII secret is still refused."""
    auth = Authenticator(store, RateLimiter(burst=1 << 30, rate_per_s=1e9))
    token = NewToken.generate()
    await store.insert_token(
        {"key": token.key, "secret_hash": hash_secret(token.secret), "limits": []}
    )
    for _ in range(2):
        assert (await auth.authenticate(str(token), "10.0.0.9")).key == token.key
    wrong = "x" if token.secret[0] != "x" else "y"
    for secret in (wrong + token.secret[1:], token.secret[:-1], token.secret[:-1] + "é", ""):
        with pytest.raises(PermissionDenied):
            await auth.authenticate(f"{token.key}:{secret}", "10.0.0.9")
