"""Token rows: looking tokens up by key or username, creating, changing and deleting them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Row, delete, select, update

from taskd.clock import now_ms
from taskd.errors import InvalidInput, NotFound
from taskd.models import token_t
from taskd.store.database import Database

SUPER_USERNAME = "root"
"""The username of the super token: NodeGet's clients recognise the super token by it."""


def new_token_row(values: dict[str, Any], now: int) -> dict[str, Any]:
    """A token row: ``values`` over the defaults of a new token."""
    return {"created_at": now, "updated_at": now, "uses": 0, "is_super": False} | values


class TokenQueries(Database):
    """Token rows."""

    async def token_by_key(self, key: str) -> Row[Any] | None:
        """The token row with that key."""
        return await self.fetch_one(select(token_t).where(token_t.c.key == key))

    async def token_by_username(self, username: str) -> Row[Any] | None:
        """The token row with that username."""
        return await self.fetch_one(select(token_t).where(token_t.c.username == username))

    async def has_super_token(self) -> bool:
        """Whether a super token exists."""
        statement = select(token_t.c.id).where(token_t.c.is_super.is_(True)).limit(1)
        return await self.fetch_one(statement) is not None

    async def list_tokens(self) -> list[Row[Any]]:
        """Every token row, oldest first."""
        return await self.fetch_all(select(token_t).order_by(token_t.c.id))

    async def insert_token(self, values: dict[str, Any]) -> int:
        """Insert a token row; 108 if its key or username is taken."""

        def add(conn: Connection) -> int:
            row = new_token_row(values, now_ms())
            username = row.get("username")
            if username is not None:
                taken = select(token_t.c.id).where(token_t.c.username == username)
                if conn.execute(taken).first() is not None:
                    raise InvalidInput(f"Username {username!r} is already taken")
            result = conn.execute(token_t.insert().returning(token_t.c.id), row)
            return int(result.scalar_one())

        return await self.write(add)

    async def find_token(self, names: Sequence[str]) -> tuple[Row[Any], str] | None:
        """The token one of ``names`` is the key or username of, and which of the two matched."""
        return await self.read(lambda conn: _named_token(conn, names))

    async def update_token(
        self, names: Sequence[str], change: Callable[[Row[Any]], dict[str, Any]]
    ) -> Row[Any]:
        """Set the values ``change(row)`` returns (it may raise) on the named token, atomically.

        ``names`` as for ``find_token``. 105 if there is no such token, 108 if a new
        username is taken; returns the new row.
        """

        def apply(conn: Connection) -> Row[Any]:
            found = _named_token(conn, names)
            if found is None:
                raise NotFound(f"No token with key or username {_shown(names)}")
            row = found[0]
            values = change(row) | {"updated_at": now_ms()}
            username = values.get("username")
            if username is not None:
                taken = select(token_t.c.id).where(
                    token_t.c.username == username, token_t.c.key != row.key
                )
                if conn.execute(taken).first() is not None:
                    raise InvalidInput(f"Username {username!r} is already taken")
            conn.execute(update(token_t).where(token_t.c.id == row.id).values(**values))
            return conn.execute(select(token_t).where(token_t.c.id == row.id)).one()

        return await self.write(apply)

    async def delete_token(
        self, names: Sequence[str], check: Callable[[Row[Any]], None]
    ) -> tuple[Row[Any], str]:
        """Delete the named token unless ``check(row)`` raises; 105 if there is no such token.

        ``names`` as for ``find_token``; returns the deleted row and what matched.
        """

        def remove(conn: Connection) -> tuple[Row[Any], str]:
            found = _named_token(conn, names)
            if found is None:
                raise NotFound(f"No token with key or username {_shown(names)}")
            check(found[0])
            conn.execute(delete(token_t).where(token_t.c.id == found[0].id))
            return found

        return await self.write(remove)


def _named_token(conn: Connection, names: Sequence[str]) -> tuple[Row[Any], str] | None:
    """The token one of ``names`` (tried in order) is the key, else the username, of.

    Returns the row and ``"token_key"`` or ``"username"``. The super token answers
    to its username even in databases made before it was given one.
    """
    for name in names:
        for column, matched_by in (
            (token_t.c.key, "token_key"),
            (token_t.c.username, "username"),
        ):
            row = conn.execute(select(token_t).where(column == name)).first()
            if row is not None:
                return row, matched_by
        if name == SUPER_USERNAME:
            statement = select(token_t).where(token_t.c.is_super.is_(True)).limit(1)
            row = conn.execute(statement).first()
            if row is not None:
                return row, "username"
    return None


def _shown(names: Sequence[str]) -> str:
    """The name a token was looked up by, for a message: never the secret of a credential."""
    return repr(names[-1])
