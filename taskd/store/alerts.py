"""Alert rows: channels, rules, events and the outbox of their deliveries.

An event changes state in the same transaction that queues its deliveries, so a
committed start or resolution is never without its notifications, and a restart
finds each one either sent or still waiting. ``open_key`` (unique while an event
fires) keeps one condition from ever having two firing events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, func, or_, select, update

from taskd.clock import now_ms
from taskd.errors import InvalidInput, NotFound
from taskd.models import (
    agent_t,
    alert_channel_t,
    alert_delivery_t,
    alert_event_t,
    alert_rule_t,
    task_t,
)
from taskd.store.database import Database

PENDING, SENT, FAILED = 0, 1, 2
"""``alert_delivery.state``"""
CHUNK = 500
"""Ids bound in one IN list."""


@dataclass(frozen=True)
class EventStart:
    """An event to start: its rule, agent, message and the channels to tell."""

    rule_id: int
    rule: str
    uuid: str
    at: int
    message: str
    channels: Sequence[str]


@dataclass(frozen=True)
class EventChange:
    """A firing event to resolve or remind about, and the channels to tell (none: silently)."""

    event_id: int
    at: int
    channels: Sequence[str]


def open_key(rule_id: int, agent_uuid: str) -> str:
    """The key a firing event of ``rule_id`` on ``agent_uuid`` holds."""
    return f"{rule_id}:{agent_uuid}"


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def _deliveries(event_id: int, kind: str, at: int, channels: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "event_id": event_id,
            "channel": channel,
            "kind": kind,
            "created_at": at,
            "next_at": at,
            "state": PENDING,
            "attempts": 0,
        }
        for channel in channels
    ]


class AlertQueries(Database):
    """Alert channel, rule, event and delivery rows."""

    # ------------------------------------------------------------------ channels

    async def insert_alert_channel(self, name: str, url: str) -> int:
        """Store a channel; its id. 108 if the name is taken."""
        insert = (
            self.backend.insert(alert_channel_t)
            .values(name=name, url=url, created_at=now_ms(), updated_at=now_ms())
            .on_conflict_do_nothing(index_elements=[alert_channel_t.c.name])
            .returning(alert_channel_t.c.id)
        )

        def add(conn: Connection) -> int:
            row = conn.execute(insert).first()
            if row is None:
                raise InvalidInput(f"An alert channel named {name!r} already exists")
            return int(row.id)

        return await self.write(add)

    async def alert_channels(self) -> list[Row[Any]]:
        """Every channel, by name."""
        return await self.fetch_all(select(alert_channel_t).order_by(alert_channel_t.c.name))

    async def alert_channel(self, name: str) -> Row[Any]:
        """The channel named ``name``; 105 if none."""
        row = await self.fetch_one(select(alert_channel_t).where(alert_channel_t.c.name == name))
        if row is None:
            raise NotFound(f"No alert channel named {name!r}")
        return row

    async def update_alert_channel(self, name: str, url: str) -> None:
        """Give a channel a new URL; 105 if none has that name."""
        c = alert_channel_t.c
        statement = (
            update(alert_channel_t).where(c.name == name).values(url=url, updated_at=now_ms())
        )

        def change(conn: Connection) -> None:
            if conn.execute(statement).rowcount == 0:
                raise NotFound(f"No alert channel named {name!r}")

        await self.write(change)

    async def delete_alert_channel(self, name: str) -> None:
        """Delete a channel; 105 if none has that name, 108 while a rule sends to it."""
        c = alert_channel_t.c

        def remove(conn: Connection) -> None:
            if conn.execute(select(c.id).where(c.name == name)).first() is None:
                raise NotFound(f"No alert channel named {name!r}")
            users = sorted(
                row.name
                for row in conn.execute(select(alert_rule_t.c.name, alert_rule_t.c.channels))
                if name in (row.channels or [])
            )
            if users:
                raise InvalidInput(
                    f"Alert channel {name!r} is used by rule(s) {', '.join(users)}: "
                    "take it out of them first"
                )
            conn.execute(delete(alert_channel_t).where(c.name == name))
            # what was still waiting for it can no longer be sent
            conn.execute(
                update(alert_delivery_t)
                .where(alert_delivery_t.c.channel == name, alert_delivery_t.c.state == PENDING)
                .values(state=FAILED, last_error="the channel was deleted")
            )

        await self.write(remove)

    # ------------------------------------------------------------------ rules

    async def insert_alert_rule(self, row: dict[str, Any]) -> int:
        """Store a rule; its id. 108 if the name is taken or a channel does not exist."""
        now = now_ms()
        insert = (
            self.backend.insert(alert_rule_t)
            .values(**row, created_at=now, updated_at=now)
            .on_conflict_do_nothing(index_elements=[alert_rule_t.c.name])
            .returning(alert_rule_t.c.id)
        )

        def add(conn: Connection) -> int:
            _check_channels(conn, row["channels"])
            stored = conn.execute(insert).first()
            if stored is None:
                raise InvalidInput(f"An alert rule named {row['name']!r} already exists")
            return int(stored.id)

        return await self.write(add)

    async def alert_rules(self) -> list[Row[Any]]:
        """Every rule, by id."""
        statement = select(alert_rule_t).order_by(alert_rule_t.c.id)
        return await self.read(lambda conn: list(conn.execute(statement)))

    async def update_alert_rule(self, name: str, row: dict[str, Any]) -> None:
        """Replace a rule (it may take a new name); 105 if none has ``name``, 108 if the new
        name is another rule's or a channel does not exist."""
        c = alert_rule_t.c

        def change(conn: Connection) -> None:
            current = conn.execute(select(c.id).where(c.name == name).with_for_update()).first()
            if current is None:
                raise NotFound(f"No alert rule named {name!r}")
            renamed = row["name"] != name
            if renamed and conn.execute(select(c.id).where(c.name == row["name"])).first():
                raise InvalidInput(f"An alert rule named {row['name']!r} already exists")
            _check_channels(conn, row["channels"])
            conn.execute(
                update(alert_rule_t).where(c.id == current.id).values(**row, updated_at=now_ms())
            )

        await self.write(change)

    async def delete_alert_rule(self, name: str) -> None:
        """Delete a rule (its events stay in the history); 105 if none has that name."""
        statement = delete(alert_rule_t).where(alert_rule_t.c.name == name)

        def remove(conn: Connection) -> None:
            if conn.execute(statement).rowcount == 0:
                raise NotFound(f"No alert rule named {name!r}")

        await self.write(remove)

    # ------------------------------------------------------------------ events

    async def open_alert_events(self) -> list[Row[Any]]:
        """Every firing event."""
        e = alert_event_t.c
        return await self.fetch_all(
            select(e.id, e.rule_id, e.uuid, e.started_at, e.reminded_at).where(
                e.open_key.is_not(None)
            )
        )

    async def start_alert_events(self, starts: Sequence[EventStart]) -> list[int | None]:
        """Start events and queue their deliveries, in one transaction; each new event's id,
        None where the condition already has a firing event."""
        e = alert_event_t.c
        insert = (
            self.backend.insert(alert_event_t)
            .values(
                rule_id=bindparam("b_rule_id"),
                rule=bindparam("b_rule"),
                uuid=bindparam("b_uuid"),
                state="firing",
                started_at=bindparam("b_at"),
                message=bindparam("b_message"),
                open_key=bindparam("b_key"),
            )
            .on_conflict_do_nothing(index_elements=[e.open_key])
        )
        keys = [open_key(item.rule_id, item.uuid) for item in starts]

        def open_ids(conn: Connection, wanted: list[str]) -> dict[str, int]:
            found: dict[str, int] = {}
            for start in range(0, len(wanted), CHUNK):
                part = wanted[start : start + CHUNK]
                rows = conn.execute(select(e.id, e.open_key).where(e.open_key.in_(part)))
                found.update({row.open_key: int(row.id) for row in rows})
            return found

        def start(conn: Connection) -> list[int | None]:
            firing = open_ids(conn, keys)
            new: list[dict[str, Any]] = [
                {
                    "b_rule_id": item.rule_id,
                    "b_rule": item.rule,
                    "b_uuid": item.uuid,
                    "b_at": item.at,
                    "b_message": item.message,
                    "b_key": key,
                }
                for item, key in zip(starts, keys, strict=True)
                if key not in firing
            ]
            if not new:
                return [None] * len(starts)
            conn.execute(insert, new)  # one statement, many rows
            queued = now_ms()
            started = open_ids(conn, [str(row["b_key"]) for row in new])
            ids: list[int | None] = []
            deliveries: list[dict[str, Any]] = []
            for item, key in zip(starts, keys, strict=True):
                event_id = None if key in firing else started.get(key)
                ids.append(event_id)
                if event_id is not None:
                    deliveries += _deliveries(event_id, "start", queued, item.channels)
            if deliveries:
                conn.execute(alert_delivery_t.insert(), deliveries)
            return ids

        return await self.write(start)

    async def resolve_alert_events(self, changes: Sequence[EventChange]) -> list[int]:
        """Resolve firing events and queue their deliveries, in one transaction; the ids
        resolved (one resolved already is left as it is)."""
        e = alert_event_t.c

        def resolve(conn: Connection) -> list[int]:
            done: list[int] = []
            deliveries: list[dict[str, Any]] = []
            for item in changes:
                statement = (
                    update(alert_event_t)
                    .where(e.id == item.event_id, e.open_key.is_not(None))
                    .values(state="resolved", resolved_at=item.at, open_key=None)
                )
                if conn.execute(statement).rowcount:
                    done.append(item.event_id)
                    deliveries += _deliveries(item.event_id, "resolve", item.at, item.channels)
            if deliveries:
                conn.execute(alert_delivery_t.insert(), deliveries)
            return done

        return await self.write(resolve)

    async def remind_alert_events(self, changes: Sequence[EventChange]) -> None:
        """Record reminders of firing events and queue their deliveries, in one transaction."""
        e = alert_event_t.c

        def remind(conn: Connection) -> None:
            deliveries: list[dict[str, Any]] = []
            for item in changes:
                statement = (
                    update(alert_event_t)
                    .where(e.id == item.event_id, e.open_key.is_not(None))
                    .values(reminded_at=item.at)
                )
                if conn.execute(statement).rowcount:
                    deliveries += _deliveries(item.event_id, "remind", item.at, item.channels)
            if deliveries:
                conn.execute(alert_delivery_t.insert(), deliveries)

        await self.write(remind)

    async def query_alert_events(
        self,
        *,
        rules: Sequence[str] = (),
        uuids: Sequence[str] = (),
        firing: bool = False,
        resolved: bool = False,
        started_from: int | None = None,
        started_to: int | None = None,
        limit: int,
    ) -> list[tuple[Row[Any], list[Row[Any]]]]:
        """Events matching every condition, newest first, each with its deliveries."""
        e = alert_event_t.c
        statement = select(alert_event_t).where(
            *[e.rule == rule for rule in set(rules)], *[e.uuid == uuid for uuid in set(uuids)]
        )
        if firing:
            statement = statement.where(e.state == "firing")
        if resolved:
            statement = statement.where(e.state == "resolved")
        if started_from is not None:
            statement = statement.where(e.started_at >= started_from)
        if started_to is not None:
            statement = statement.where(e.started_at <= started_to)
        statement = statement.order_by(e.started_at.desc(), e.id.desc()).limit(limit)
        d = alert_delivery_t.c

        def fetch(conn: Connection) -> list[tuple[Row[Any], list[Row[Any]]]]:
            events = list(conn.execute(statement))
            by_event: dict[int, list[Row[Any]]] = {}
            for part in _chunks([row.id for row in events]):
                rows = conn.execute(
                    select(alert_delivery_t).where(d.event_id.in_(part)).order_by(d.id)
                )
                for row in rows:
                    by_event.setdefault(row.event_id, []).append(row)
            return [(row, by_event.get(row.id, [])) for row in events]

        return await self.read(fetch)

    # ------------------------------------------------------------------ agents

    async def agent_presence(
        self, uuids: Sequence[str] | None = None, *, held_by: Sequence[str] | None = None
    ) -> list[Row[Any]]:
        """(uuid, connected_since, node_id, last_seen) of the listed agents (all if None) that
        are not soft-deleted; with ``held_by`` (node ids), only those not connected to one
        of these nodes (few, in a healthy fleet: the database filters the rest)."""
        a = agent_t.c
        base = select(a.uuid, a.connected_since, a.node_id, a.last_seen).where(
            a.deleted_at.is_(None)
        )
        if held_by is not None:
            base = base.where(
                or_(
                    a.connected_since.is_(None),
                    a.node_id.is_(None),
                    a.node_id.not_in(list(held_by)),
                )
            )
        wanted = None if uuids is None else list(uuids)

        def fetch(conn: Connection) -> list[Row[Any]]:
            if wanted is None:
                return list(conn.execute(base))
            rows: list[Row[Any]] = []
            for start in range(0, len(wanted), CHUNK):
                rows += conn.execute(base.where(a.uuid.in_(wanted[start : start + CHUNK])))
            return rows

        return await self.read(fetch)

    async def cron_task_outcomes(
        self, cron: str, *, from_id: int | None, since: int, limit: int = 10_000
    ) -> list[Row[Any]]:
        """The tasks a cron created, by id: from ``from_id`` on, or (None) those created or
        answered since ``since`` ms; each with its state and outcome."""
        c = task_t.c
        statement = select(
            c.id, c.uuid, c.state, c.success, c.task_event_result, c.error_message
        ).where(c.cron_source == cron)
        if from_id is None:
            statement = statement.where(c.order_ts >= since)
        else:
            statement = statement.where(c.id >= from_id)
        return await self.fetch_all(statement.order_by(c.id).limit(limit))

    # ------------------------------------------------------------------ deliveries

    async def due_alert_channels(self, now: int) -> dict[str, int]:
        """Channel → the earliest time one of its waiting deliveries is due (claimed ones
        from when their claim ends)."""
        d = alert_delivery_t.c
        due = func.min(func.coalesce(d.claimed_until, d.next_at))
        statement = select(d.channel, due).where(d.state == PENDING).group_by(d.channel)
        return await self.read(
            lambda conn: {str(name): int(at) for name, at in conn.execute(statement)}
        )

    async def claim_alert_deliveries(
        self, channel: str, node_id: str, now: int, lease_ms: int, limit: int
    ) -> list[Row[Any]]:
        """Claim up to ``limit`` due deliveries of a channel for ``lease_ms``; each with its
        event's rule, agent, times and message, oldest first."""
        d, e = alert_delivery_t.c, alert_event_t.c
        due = (
            select(d.id)
            .where(
                d.state == PENDING,
                d.channel == channel,
                d.next_at <= now,
                or_(d.claimed_until.is_(None), d.claimed_until < now),
            )
            .order_by(d.id)
            .limit(limit)
        )
        if not self.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        joined = (
            select(
                d.id,
                d.kind,
                d.attempts,
                e.rule,
                e.uuid,
                e.started_at,
                e.resolved_at,
                e.message,
            )
            .select_from(alert_delivery_t.join(alert_event_t, e.id == d.event_id))
            .order_by(d.id)
        )

        def claim(conn: Connection) -> list[Row[Any]]:
            ids = [row.id for row in conn.execute(due)]
            rows: list[Row[Any]] = []
            for part in _chunks(ids):
                conn.execute(
                    update(alert_delivery_t)
                    .where(d.id.in_(part))
                    .values(claimed_by=node_id, claimed_until=now + lease_ms)
                )
                rows += conn.execute(joined.where(d.id.in_(part)))
            return rows

        return await self.write(claim)

    async def settle_alert_deliveries(
        self,
        ids: Sequence[int],
        *,
        sent_at: int | None,
        error: str | None = None,
        retry_at: int | None = None,
    ) -> None:
        """Record one attempt of these deliveries: sent (``sent_at``), to be retried at
        ``retry_at``, or given up (neither)."""
        d = alert_delivery_t.c
        values: dict[str, Any] = {
            "attempts": d.attempts + 1,
            "claimed_by": None,
            "claimed_until": None,
        }
        if error is not None:  # a later success keeps the last failure on record
            values["last_error"] = error
        if sent_at is not None:
            values |= {"state": SENT, "sent_at": sent_at}
        elif retry_at is not None:
            values |= {"next_at": retry_at}
        else:
            values |= {"state": FAILED}

        def settle(conn: Connection) -> None:
            for part in _chunks(list(ids)):
                conn.execute(
                    update(alert_delivery_t)
                    .where(d.id.in_(part), d.state == PENDING)
                    .values(values)
                )

        await self.write(settle)

    async def release_alert_claims(self, node_id: str | None = None) -> None:
        """Give up the claims ``node_id`` holds (its clean shutdown), or every claim (a node
        that just took over the sending: whoever claimed before it no longer sends)."""
        d = alert_delivery_t.c
        statement = (
            update(alert_delivery_t)
            .where(d.state == PENDING, d.claimed_by.is_not(None))
            .values(claimed_by=None, claimed_until=None)
        )
        if node_id is not None:
            statement = statement.where(d.claimed_by == node_id)
        await self.write(lambda conn: conn.execute(statement).rowcount)


def _check_channels(conn: Connection, names: Sequence[str]) -> None:
    """108 unless every named channel exists."""
    if not names:
        return
    c = alert_channel_t.c
    found = {row.name for row in conn.execute(select(c.name).where(c.name.in_(list(names))))}
    missing = [name for name in names if name not in found]
    if missing:
        raise InvalidInput(f"No alert channel named {missing[0]!r}: create it first")
