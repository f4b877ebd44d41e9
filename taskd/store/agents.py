"""Agent rows: where each agent is connected, when it was last seen, and enrollment.

Subscriptions and calls are hot writes (``AgentConnectedOp``, ``AgentsSeenOp``): a
reconnect storm is one statement per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Select,
    bindparam,
    case,
    func,
    null,
    or_,
    select,
    true,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.expression import ClauseElement

from taskd.clock import now_ms
from taskd.errors import InvalidInput, PermissionDenied
from taskd.models import OPEN_TASK, agent_t, cron_t, task_t, token_t
from taskd.store.backend import Backend, Driver
from taskd.store.database import Database
from taskd.store.tokens import new_token_row
from taskd.store.writer import HotOp

CONNECTED_COLUMNS = (
    "uuid",
    "first_seen",
    "last_seen",
    "connected_since",
    "remote_addr",
    "node_id",
    "token_key",
)
"""What a subscription records; all but ``uuid`` and ``first_seen`` replace the old values."""


def _connected(backend: Backend) -> ClauseElement:
    insert = backend.insert(agent_t).values({name: bindparam(name) for name in CONNECTED_COLUMNS})
    replaced = {name: insert.excluded[name] for name in CONNECTED_COLUMNS[2:]}
    return insert.on_conflict_do_update(
        index_elements=[agent_t.c.uuid], set_=replaced | {"deleted_at": null()}
    )


@dataclass(eq=False)
class AgentConnectedOp(HotOp):
    """Record an agent's subscription: a whole reconnect storm is one statement."""

    values: dict[str, Any]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        latest = {op.values["uuid"]: op.values for op in ops}
        statement = driver.backend.statement(_connected)
        await driver.execute_many(statement, [statement.args(v) for v in latest.values()])
        channels = driver.backend.channels
        if channels is not None:
            items = [f"{u} {v['node_id']}" for u, v in latest.items()]
            await driver.notify(channels.agents, items)
        return [None] * len(ops)


def _seen(backend: Backend) -> ClauseElement:
    c = agent_t.c
    insert = backend.insert(agent_t).values(
        uuid=bindparam("uuid"), first_seen=bindparam("at"), last_seen=bindparam("at")
    )
    seen = insert.excluded.last_seen
    return insert.on_conflict_do_update(
        index_elements=[c.uuid],
        set_={
            "last_seen": case((seen > c.last_seen, seen), else_=c.last_seen),
            # one soft-deleted before this call is listed again
            "deleted_at": case((c.deleted_at < seen, null()), else_=c.deleted_at),
        },
    )


@dataclass(eq=False)
class AgentsSeenOp(HotOp):
    """Record agents' calls (uuid → ms): an unknown agent gets its row, and one soft-deleted
    before the call is listed again; all waiting ops are one statement."""

    seen: dict[str, int]

    @classmethod
    async def run_all(cls, driver: Driver, ops: Sequence[Any]) -> list[Any]:
        latest: dict[str, int] = {}
        for op in ops:
            for agent_uuid, at in op.seen.items():
                latest[agent_uuid] = max(at, latest.get(agent_uuid, at))
        statement = driver.backend.statement(_seen)
        # in key order, so batches of two nodes cannot deadlock on each other's rows
        rows = [statement.args({"uuid": u, "at": at}) for u, at in sorted(latest.items())]
        await driver.execute_many(statement, rows)
        return [None] * len(ops)


class AgentQueries(Database):
    """Agent rows."""

    async def agent_connected(
        self,
        agent_uuid: str,
        remote_addr: str | None,
        node_id: str,
        token_key: str | None,
        *,
        since: int | None = None,
    ) -> None:
        """Record that an agent subscribed here (connected ``since`` ms, now by default)."""
        now = now_ms()
        values = {
            "uuid": agent_uuid,
            "first_seen": now,
            "last_seen": now,
            "connected_since": now if since is None else since,
            "remote_addr": remote_addr,
            "node_id": node_id,
            "token_key": token_key,
        }
        await self.submit(AgentConnectedOp(values))

    async def agents_seen(self, seen: dict[str, int]) -> None:
        """Record agents' authenticated calls (uuid → ms): each is known from then on, and one
        soft-deleted before its call is listed again."""
        if seen:
            await self.submit(AgentsSeenOp(seen))

    async def agents_disconnected(self, seen: dict[str, int], node_id: str) -> None:
        """Record that agents' subscriptions on this node ended (``seen``: uuid → last seen ms)."""
        if not seen:
            return
        c = agent_t.c
        statement = (
            update(agent_t)
            .where(c.uuid == bindparam("b_uuid"), c.node_id == node_id)
            .values(connected_since=None, last_seen=bindparam("last_seen"))
        )
        channels = self.channels

        def mark(conn: Connection) -> None:
            conn.execute(statement, [{"b_uuid": u, "last_seen": t} for u, t in seen.items()])
            if channels is not None:
                self.backend.notify(conn, channels.agents, [f"{u} -" for u in seen])

        await self.write(mark)

    async def touch_agents(self, seen: dict[str, int]) -> None:
        """Update agents' last-seen times."""
        if not seen:
            return
        statement = (
            update(agent_t)
            .where(agent_t.c.uuid == bindparam("b_uuid"))
            .values(last_seen=bindparam("last_seen"))
        )

        def mark(conn: Connection) -> None:
            conn.execute(statement, [{"b_uuid": u, "last_seen": t} for u, t in seen.items()])

        await self.write(mark)

    async def reset_node_agents(self, node_id: str) -> None:
        """Mark every agent recorded on ``node_id`` as disconnected (the node restarted)."""
        c = agent_t.c
        statement = (
            update(agent_t)
            .where(c.node_id == node_id, c.connected_since.is_not(None))
            .values(connected_since=None)
        )

        def mark(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(mark)

    async def list_agents(self) -> list[Row[Any]]:
        """Every agent ever seen."""
        return await self.fetch_all(select(agent_t).order_by(agent_t.c.uuid))

    async def connected_agents(self) -> list[Row[Any]]:
        """(uuid, node_id) of every agent recorded as connected."""
        return await self.fetch_all(
            select(agent_t.c.uuid, agent_t.c.node_id).where(agent_t.c.connected_since.is_not(None))
        )

    async def soft_delete_agent(self, agent_uuid: str) -> bool:
        """Leave an agent out of the lists from now on (its history stays); False if unknown."""
        c = agent_t.c

        def mark(conn: Connection) -> bool:
            row = conn.execute(select(c.deleted_at).where(c.uuid == agent_uuid)).first()
            if row is None:
                return False
            if row.deleted_at is None:
                conn.execute(
                    update(agent_t).where(c.uuid == agent_uuid).values(deleted_at=now_ms())
                )
            return True

        return await self.write(mark)

    async def enroll_agent(
        self, enroll_key: str, agent_uuid: str, token: dict[str, Any], remote_addr: str | None
    ) -> None:
        """Use up one use of an enrollment token, claim ``agent_uuid`` and store its token.

        All in one transaction: 102 if the enrollment token has no uses left (or is
        gone), 108 if an agent row, another token's scope, an unanswered task or a
        cron already claims the UUID. The claims are looked up by the database, each
        stopping at the first match.
        """
        t = token_t.c
        use = (
            update(token_t)
            .where(t.key == enroll_key, or_(t.max_uses.is_(None), t.uses < t.max_uses))
            .values(uses=t.uses + 1)
            .returning(t.uses)
        )
        scoped = _scoped_elsewhere(self.backend, agent_uuid, enroll_key)
        # work already waits for this UUID: whoever enrolls it would receive that work
        waiting = select(task_t.c.id).where(task_t.c.uuid == agent_uuid, OPEN_TASK).limit(1)
        targeted = _cron_targets(self.backend, agent_uuid)
        now = now_ms()
        insert = self.backend.insert(agent_t)
        claim = (
            insert.values(
                uuid=agent_uuid,
                first_seen=now,
                last_seen=now,
                remote_addr=remote_addr,
                token_key=token["key"],
            )
            .on_conflict_do_nothing(index_elements=[agent_t.c.uuid])
            .returning(agent_t.c.uuid)
        )
        row = new_token_row(token, now)

        def enroll(conn: Connection) -> None:
            if conn.execute(use).first() is None:
                raise PermissionDenied(
                    f"Enrollment token {enroll_key} has no uses left or was revoked"
                )
            if conn.execute(scoped).first() is not None:
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken")
            if (
                conn.execute(waiting).first() is not None
                or conn.execute(targeted).first() is not None
            ):
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken: work waits for it")
            if conn.execute(claim).first() is None:
                raise InvalidInput(f"Agent UUID {agent_uuid} is already taken")
            conn.execute(token_t.insert(), [row])

        await self.write(enroll)


def _scoped_elsewhere(backend: Backend, agent_uuid: str, enroll_key: str) -> Select[Any]:
    """A token other than ``enroll_key`` with a limit scoped to the agent ``agent_uuid``."""
    t = token_t.c
    if backend.is_sqlite:
        limit = func.json_each(t.limits).table_valued("value", "type").alias("lim")
        scopes = func.json_each(case((limit.c.type == "object", limit.c.value)), "$.scopes")
        scope = scopes.table_valued("value", "type").alias("scope")
        return (
            select(t.id)
            .select_from(token_t.join(limit, true()).join(scope, true()))
            .where(
                t.key != enroll_key,
                scope.c.type == "object",
                func.json_extract(scope.c.value, "$.agent_uuid") == agent_uuid,
            )
            .limit(1)
        )
    scoped = [{"scopes": [{"agent_uuid": agent_uuid}]}]
    return (
        select(t.id)
        .where(t.key != enroll_key, type_coerce(t.limits, JSONB).contains(scoped))
        .limit(1)
    )


def _cron_targets(backend: Backend, agent_uuid: str) -> Select[Any]:
    """A cron that creates tasks for ``agent_uuid`` (type ``{"agent": [[uuid ...], task]}``)."""
    c = cron_t.c
    if backend.is_sqlite:
        target = func.json_each(c.cron_type, "$.agent[0]").table_valued("value").alias("target")
        return (
            select(c.id)
            .select_from(cron_t.join(target, true()))
            .where(
                func.json_type(c.cron_type, "$.agent[0]") == "array", target.c.value == agent_uuid
            )
            .limit(1)
        )
    uuids = type_coerce(func.jsonb_extract_path(c.cron_type, "agent", "0"), JSONB)
    return (
        select(c.id).where(func.jsonb_typeof(uuids) == "array", uuids.has_key(agent_uuid)).limit(1)
    )
