"""Cron rows, the fires claimed for each slot, and the result rows of each fire."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    delete,
    func,
    or_,
    select,
    update,
)

from taskd.errors import InvalidInput, NotFound
from taskd.models import cron_fire_t, cron_result_t, cron_t
from taskd.protocol import DEFAULT_QUERY_LIMIT, CronResultQuery
from taskd.store.database import Database, each_equal, outcome


class CronQueries(Database):
    """Cron, cron_fire and cron_result rows."""

    async def insert_cron(self, values: dict[str, Any], *, now: int) -> Row[Any]:
        """Insert a cron and return its row; 108 if the name is taken.

        ``now`` (ms) stamps it created and updated: a time of the scheduler's clock, which
        decides the slots missed since a cron changed."""
        sqlite = self.is_sqlite

        def add(conn: Connection) -> Row[Any]:
            taken = select(cron_t.c.id).where(cron_t.c.name == values["name"])
            if conn.execute(taken).first() is not None:
                raise InvalidInput(f"A cron named {values['name']!r} already exists")
            row = {"enable": True, "created_at": now, "updated_at": now} | values
            if sqlite:
                row["id"] = _next_cron_id(conn)
            return conn.execute(cron_t.insert().values(row).returning(*cron_t.c)).one()

        return await self.write(add)

    async def update_cron(
        self,
        name: str,
        values: dict[str, Any],
        check: Callable[[Row[Any]], None] | None = None,
        *,
        now: int,
    ) -> Row[Any]:
        """Change a cron and return the new row; 105 if none has that name.

        ``check`` sees the current row inside the transaction and may raise to refuse;
        ``now`` (ms) stamps it updated (the scheduler's clock, as in ``insert_cron``).
        """

        def change(conn: Connection) -> Row[Any]:
            current = _current(conn, name, check)
            statement = (
                update(cron_t)
                .where(cron_t.c.id == current.id)
                .values(updated_at=now, **values)
                .returning(*cron_t.c)
            )
            return conn.execute(statement).one()

        return await self.write(change)

    async def delete_cron(
        self, name: str, check: Callable[[Row[Any]], None] | None = None
    ) -> Row[Any]:
        """Delete a cron (its fire history stays) and return the deleted row; 105 if none."""

        def remove(conn: Connection) -> Row[Any]:
            current = _current(conn, name, check)
            conn.execute(delete(cron_t).where(cron_t.c.id == current.id))
            return current

        return await self.write(remove)

    async def cron_by_id(self, cron_id: int) -> Row[Any] | None:
        """The cron with that id, or None (deleted)."""
        return await self.fetch_one(select(cron_t).where(cron_t.c.id == cron_id))

    async def cron_by_name(self, name: str) -> Row[Any] | None:
        """The cron with that name."""
        return await self.fetch_one(select(cron_t).where(cron_t.c.name == name))

    async def list_crons(self, *, enabled_only: bool = False) -> list[Row[Any]]:
        """Every cron (or every enabled one), by id."""
        statement = select(cron_t).order_by(cron_t.c.id)
        if enabled_only:
            statement = statement.where(cron_t.c.enable.is_(True))
        return await self.fetch_all(statement)

    async def claim_cron_slot(
        self, cron_id: int, slot: int, fired_at: int, node_id: str
    ) -> Row[Any] | None:
        """Record that a cron fires ``slot`` and return its row.

        None if the cron is gone or disabled, or the slot was already fired (by an
        earlier run of this node or by another node): the unique (cron_id, slot)
        row is the guard, written in the same transaction as ``last_run_time``.
        The fire stays pending, holding the cron's name and targets as they were,
        until ``settle_cron_fire`` stores its result rows.
        """
        enabled = select(cron_t).where(cron_t.c.id == cron_id, cron_t.c.enable.is_(True))
        advance = (
            update(cron_t)
            .where(
                cron_t.c.id == cron_id,
                or_(cron_t.c.last_run_time.is_(None), cron_t.c.last_run_time < slot),
            )
            .values(last_run_time=slot)
        )
        insert = self.backend.insert(cron_fire_t)

        def claim(conn: Connection) -> Row[Any] | None:
            cron = conn.execute(enabled).first()
            if cron is None:
                return None
            fire = (
                insert.values(
                    cron_id=cron_id,
                    slot=slot,
                    fired_at=fired_at,
                    node_id=node_id,
                    pending={"cron_name": cron.name, "cron_type": cron.cron_type},
                )
                .on_conflict_do_nothing(index_elements=[cron_fire_t.c.cron_id, cron_fire_t.c.slot])
                .returning(cron_fire_t.c.id)
            )
            if conn.execute(fire).first() is None:
                return None
            conn.execute(advance)
            return cron

        return await self.write(claim)

    async def settle_cron_fire(
        self, cron_id: int, slot: int, rows: Sequence[dict[str, Any]]
    ) -> bool:
        """Store the result rows of a pending fire; False if it was settled already.

        The fire stops being pending in the same transaction, so each claimed slot
        gets exactly one set of rows, whoever settles it first: the fire itself, or
        the scheduler that finds it cut short.
        """
        fire = cron_fire_t.c
        settled = (
            update(cron_fire_t)
            .where(fire.cron_id == cron_id, fire.slot == slot, fire.pending.is_not(None))
            .values(pending=None)
            .returning(fire.id)
        )

        def settle(conn: Connection) -> bool:
            if conn.execute(settled).first() is None:
                return False
            if rows:
                conn.execute(cron_result_t.insert(), list(rows))
            return True

        return await self.write(settle)

    async def pending_cron_fires(self) -> list[Row[Any]]:
        """Claimed fires without result rows yet: running now, or cut short."""
        fire = cron_fire_t.c
        return await self.fetch_all(
            select(fire.cron_id, fire.slot, fire.fired_at, fire.node_id, fire.pending)
            .where(fire.pending.is_not(None))
            .order_by(fire.id)
        )

    async def cron_result_names(self) -> list[str]:
        """Every cron name that has results."""
        statement = select(cron_result_t.c.cron_name).distinct()
        return await self.read(lambda conn: [str(n) for n in conn.execute(statement).scalars()])

    async def query_cron_results(
        self, query: CronResultQuery, names: Sequence[str] | None = None
    ) -> list[Row[Any]]:
        """Cron results matching every condition (and, if given, one of ``names``), newest first."""
        return await self.fetch_all(
            _results_filtered(select(cron_result_t), query, names, DEFAULT_QUERY_LIMIT)
        )

    async def delete_cron_results(
        self, query: CronResultQuery, names: Sequence[str] | None = None
    ) -> int:
        """Delete the cron results a query selects (all of them unless it has a limit)."""
        ids = _results_filtered(select(cron_result_t.c.id), query, names, None).scalar_subquery()
        statement = delete(cron_result_t).where(cron_result_t.c.id.in_(ids))
        return await self.write(lambda conn: int(conn.execute(statement).rowcount))

    async def prune_cron_results(self, cron_id: int | None, before_ms: int, chunk: int) -> int:
        """Delete up to ``chunk`` result rows run before ``before_ms``, oldest first; how many
        went. ``cron_id`` None: the rows of every cron without its own retention (deleted
        crons included)."""
        c = cron_result_t.c
        chosen = (
            select(c.id)
            .where(_whose(c.cron_id, cron_id), c.run_time < before_ms)
            .order_by(c.run_time)
            .limit(chunk)
        )
        statement = delete(cron_result_t).where(c.id.in_(chosen.scalar_subquery()))
        return await self.write(lambda conn: int(conn.execute(statement).rowcount))

    async def prune_cron_fires(self, cron_id: int | None, before_ms: int, chunk: int) -> int:
        """Delete up to ``chunk`` settled fires of slots before ``before_ms`` (``cron_id`` as in
        ``prune_cron_results``) and behind their cron's last run: such a slot is never
        fired again, so its guard row is no longer needed. How many went."""
        fire = cron_fire_t.c
        cron = cron_t.c
        last_run = select(cron.last_run_time).where(cron.id == fire.cron_id).scalar_subquery()
        chosen = (
            select(fire.id)
            .where(
                _whose(fire.cron_id, cron_id),
                fire.slot < before_ms,
                fire.pending.is_(None),
                or_(last_run.is_(None), fire.slot < last_run),
            )
            .order_by(fire.slot)
            .limit(chunk)
        )
        statement = delete(cron_fire_t).where(fire.id.in_(chosen.scalar_subquery()))
        return await self.write(lambda conn: int(conn.execute(statement).rowcount))


def _whose(column: ColumnElement[Any], cron_id: int | None) -> ColumnElement[bool]:
    """Rows of cron ``cron_id``; None: of every cron without its own result retention."""
    if cron_id is not None:
        return column == cron_id
    own = select(cron_t.c.id).where(cron_t.c.result_retention_ms.is_not(None))
    return column.not_in(own.scalar_subquery())


def _current(conn: Connection, name: str, check: Callable[[Row[Any]], None] | None) -> Row[Any]:
    """The cron named ``name``, locked; 105 if none, or whatever ``check`` raises."""
    statement = select(cron_t).where(cron_t.c.name == name).with_for_update()
    current = conn.execute(statement).first()
    if current is None:
        raise NotFound(f"No cron named {name!r}")
    if check is not None:
        check(current)
    return current


def _next_cron_id(conn: Connection) -> int:
    # SQLite hands the highest rowid out again once its row is deleted, but a
    # deleted cron's history keeps its id: a new cron must not inherit it
    highest = select(func.max(cron_t.c.id)).union_all(
        select(func.max(cron_fire_t.c.cron_id)), select(func.max(cron_result_t.c.cron_id))
    )
    values = conn.execute(highest).scalars().all()
    return max((int(v) for v in values if v is not None), default=0) + 1


def _results_filtered(
    statement: Select[Any],
    query: CronResultQuery,
    names: Sequence[str] | None,
    default_limit: int | None,
) -> Select[Any]:
    c = cron_result_t.c
    statement = statement.where(
        *each_equal(c.id, query.ids),
        *each_equal(c.cron_id, query.cron_ids),
        *each_equal(c.cron_name, query.cron_names),
        *outcome(c.success, query.is_success, query.is_failure),
    )
    if names is not None:
        statement = statement.where(c.cron_name.in_(names))
    if query.run_time_from is not None:
        statement = statement.where(c.run_time >= query.run_time_from)
    if query.run_time_to is not None:
        statement = statement.where(c.run_time <= query.run_time_to)
    statement = statement.order_by(c.run_time.desc(), c.id.desc())
    limit = default_limit if query.limit is None else query.limit
    return statement if limit is None else statement.limit(limit)
