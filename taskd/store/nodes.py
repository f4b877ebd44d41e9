"""Node rows (the server processes of a cluster and their heartbeats), and announcements."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select, update

from taskd.clock import now_ms
from taskd.models import node_t
from taskd.store.database import Database


class NodeQueries(Database):
    """Node rows."""

    async def node_heartbeat(self, node_id: str, address: str, *, started: bool = False) -> None:
        """Record that a node is alive (and where other nodes reach it)."""
        now = now_ms()
        insert = self.backend.insert(node_t).values(
            id=node_id, address=address, started_at=now, heartbeat=now
        )
        columns = ["address", "heartbeat"] + (["started_at"] if started else [])
        statement = insert.on_conflict_do_update(
            index_elements=[node_t.c.id], set_={name: insert.excluded[name] for name in columns}
        )

        def beat(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(beat)

    async def node_left(self, node_id: str) -> None:
        """A node shut down: its heartbeat stops counting at once."""
        statement = update(node_t).where(node_t.c.id == node_id).values(heartbeat=0)

        def leave(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(leave)

    async def list_nodes(self) -> list[Row[Any]]:
        """Every node row."""
        return await self.fetch_all(select(node_t))

    async def node(self, node_id: str) -> Row[Any] | None:
        """The row of one node, or None."""
        return await self.fetch_one(select(node_t).where(node_t.c.id == node_id))

    async def announce(self, channel: str, payload: str) -> None:
        """NOTIFY one payload on a channel at commit (PostgreSQL; nothing on SQLite)."""

        def send(conn: Connection) -> None:
            self.backend.notify(conn, channel, [payload])

        await self.write(send)
