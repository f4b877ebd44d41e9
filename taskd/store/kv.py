"""KV rows: namespaces (one exists while it holds a key) and their keys' JSON values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, or_, select

from taskd.errors import InvalidInput, NotFound
from taskd.models import kv_t
from taskd.store.database import Database

KV_CHUNK = 500
"""Names bound in one IN list: well under every driver's limit on parameters."""
KV_SQL_PREFIXES = 8
"""Up to this many key prefixes narrow a read in SQL; more are checked only in Python."""

Values = dict[tuple[str, str], Any]
Matched = dict[str, list[tuple[str, Any]]]


class KvQueries(Database):
    """KV rows."""

    async def kv_namespaces(self) -> list[str]:
        """Every KV namespace (a namespace exists while it holds a key), sorted."""
        statement = select(kv_t.c.namespace).distinct()
        return await self.read(lambda conn: sorted(ns for (ns,) in conn.execute(statement)))

    async def kv_create(self, namespace: str, marker: str) -> None:
        """Create a KV namespace by storing its ``marker`` key (value null); 108 if it exists."""
        statement = (
            self.backend.insert(kv_t)
            .values(namespace=namespace, key=marker, value=None)
            .on_conflict_do_nothing(index_elements=[kv_t.c.namespace, kv_t.c.key])
            .returning(kv_t.c.id)
        )

        def create(conn: Connection) -> None:
            if _exists(conn, namespace) or conn.execute(statement).first() is None:
                # the second: created by another node meanwhile
                raise InvalidInput(f"KV namespace {namespace!r} already exists")

        await self.write(create)

    async def kv_get(self, namespace: str, key: str) -> Any:
        """The value of ``key`` (None if it has none); 105 if the namespace does not exist."""
        statement = select(kv_t.c.value).where(kv_t.c.namespace == namespace, kv_t.c.key == key)

        def fetch(conn: Connection) -> Any:
            row = conn.execute(statement).first()
            if row is not None:
                return row.value
            _check_exists(conn, namespace)
            return None

        return await self.read(fetch)

    async def kv_keys(self, namespace: str) -> list[str]:
        """Every key of a namespace, sorted; 105 if the namespace does not exist."""
        statement = select(kv_t.c.key).where(kv_t.c.namespace == namespace)

        def fetch(conn: Connection) -> list[str]:
            keys = sorted(key for (key,) in conn.execute(statement))
            if not keys:
                raise _no_namespace(namespace)
            return keys

        return await self.read(fetch)

    async def kv_set(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any; 105 if the namespace does not exist."""
        insert = self.backend.insert(kv_t).values(namespace=namespace, key=key, value=value)
        statement = insert.on_conflict_do_update(
            index_elements=[kv_t.c.namespace, kv_t.c.key], set_={"value": insert.excluded.value}
        )

        def store(conn: Connection) -> None:
            _check_exists(conn, namespace)
            conn.execute(statement)

        await self.write(store)

    async def kv_delete(self, namespace: str, key: str) -> None:
        """Remove ``key`` (nothing if it is absent); 105 if the namespace does not exist."""
        statement = delete(kv_t).where(kv_t.c.namespace == namespace, kv_t.c.key == key)

        def remove(conn: Connection) -> None:
            _check_exists(conn, namespace)
            conn.execute(statement)

        await self.write(remove)

    async def kv_get_many(
        self, exact: Sequence[tuple[str, str]], prefixed: Sequence[tuple[str, str]]
    ) -> tuple[Values, Matched]:
        """Values of exact (namespace, key) pairs, and the sorted (key, value) pairs of each
        namespace named with a key prefix whose key starts with one of its prefixes."""
        return await self.read(lambda conn: (_exact(conn, exact), _prefixed(conn, prefixed)))


def _exact(conn: Connection, exact: Sequence[tuple[str, str]]) -> Values:
    values: Values = {}
    wanted = set(exact)
    spaces = sorted({namespace for namespace, _ in wanted})
    keys = sorted({key for _, key in wanted})
    c = kv_t.c
    for spaces_part in _chunks(spaces, KV_CHUNK):
        for keys_part in _chunks(keys, KV_CHUNK):
            rows = conn.execute(
                select(c.namespace, c.key, c.value).where(
                    c.namespace.in_(spaces_part), c.key.in_(keys_part)
                )
            )
            values.update(((ns, key), value) for ns, key, value in rows if (ns, key) in wanted)
    return values


def _prefixed(conn: Connection, prefixed: Sequence[tuple[str, str]]) -> Matched:
    prefixes: dict[str, set[str]] = {}
    for namespace, prefix in prefixed:
        prefixes.setdefault(namespace, set()).add(prefix)
    distinct = {prefix for group in prefixes.values() for prefix in group}
    c = kv_t.c
    # a few prefixes narrow the read in SQL; any key still passes the check below
    narrow = (
        [func.substr(c.key, 1, len(prefix)) == prefix for prefix in sorted(distinct)]
        if "" not in distinct and len(distinct) <= KV_SQL_PREFIXES
        else []
    )
    matched: Matched = {}
    for spaces_part in _chunks(sorted(prefixes), KV_CHUNK):
        statement = select(c.namespace, c.key, c.value).where(c.namespace.in_(spaces_part))
        if narrow:
            statement = statement.where(or_(*narrow))
        for ns, key, value in conn.execute(statement):
            if any(key.startswith(prefix) for prefix in prefixes[ns]):
                matched.setdefault(ns, []).append((key, value))
    for pairs in matched.values():
        pairs.sort(key=lambda pair: pair[0])
    return matched


def _exists(conn: Connection, namespace: str) -> bool:
    statement = select(kv_t.c.id).where(kv_t.c.namespace == namespace).limit(1)
    return conn.execute(statement).first() is not None


def _check_exists(conn: Connection, namespace: str) -> None:
    if not _exists(conn, namespace):
        raise _no_namespace(namespace)


def _no_namespace(namespace: str) -> NotFound:
    return NotFound(f"KV namespace {namespace!r} does not exist")


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
