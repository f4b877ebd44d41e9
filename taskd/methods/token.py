"""Token methods: create, inspect, list, edit, delete, roll the secret, change the password.

Each needs the super token or a global ``{"token": "read"|"write"|"delete"}``
permission (read: get and list; write: create, edit, roll, change_password).
A token that is not super can never hand out or take over more than it holds
itself: every (scope, permission) pair of the token it creates, edits, rolls,
re-passwords or deletes must be covered by one of its own limits, and a token
it creates, edits, rolls or re-passwords cannot stay valid longer than it does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from taskd.auth import Need, NewToken, Principal, authorize, hash_secret
from taskd.errors import InvalidInput, InvalidParams, PermissionDenied
from taskd.protocol import Limit, limits_to_wire, parse_limits
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)

MAX_MS = (1 << 53) - 1


class _Unchanged:
    """The default of an optional ``token_edit`` param: leave that field as it is."""

    def __repr__(self) -> str:
        return "unchanged"


UNCHANGED: Any = _Unchanged()


# --------------------------------------------------------------------------- params


def _ms(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MS:
        raise InvalidParams(f"{field}: must be a millisecond timestamp (integer >= 0) or null")
    return value


def _text(value: Any, field: str, longest: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > longest:
        raise InvalidParams(f"{field}: must be a string of at most {longest} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidParams(f"{field}: must not contain control characters")
    return value


def _key(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise InvalidParams("key: must be a token key (1 to 64 characters)")
    return value


def _username(value: Any) -> str | None:
    username = _text(value, "username", 128)
    # a username with ':' or '|' could never log in: the token string splits on them
    if username is not None and (not username or ":" in username or "|" in username):
        raise InvalidParams("username: must be non-empty and contain neither ':' nor '|'")
    return username


def _password(value: Any) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 256:
        raise InvalidParams("password: must be a string of 8 to 256 characters")
    if ":" in value:  # "USERNAME|PASS:WORD" would be read as KEY:SECRET
        raise InvalidParams("password: must not contain ':'")
    return value


def _max_uses(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MS:
        raise InvalidParams("max_uses: must be a positive integer or null")
    return value


def _window(timestamp_from: int | None, timestamp_to: int | None) -> None:
    if timestamp_from is not None and timestamp_to is not None and timestamp_from > timestamp_to:
        raise InvalidInput("timestamp_from is after timestamp_to")


# --------------------------------------------------------------------------- escalation guard


def _is_global(scope: Any) -> bool:
    return scope == "global" or (isinstance(scope, dict) and "global" in scope)


def _pattern_covers(outer: str, inner: str) -> bool:
    """Whether every name ``inner`` matches is matched by ``outer`` (any name, not just today's)."""
    if outer == "*":
        return True
    if outer.endswith("*"):
        return inner.startswith(outer[:-1])
    return inner == outer


def _permission_covers(outer: dict[str, Any], inner: dict[str, Any]) -> bool:
    [(category, action)] = outer.items()
    [(inner_category, inner_action)] = inner.items()
    if category != inner_category:
        return False
    if isinstance(action, dict) and isinstance(inner_action, dict):
        [(verb, pattern)] = action.items()
        [(inner_verb, inner_pattern)] = inner_action.items()
        return verb == inner_verb and _pattern_covers(pattern, inner_pattern)
    return bool(action == inner_action)


def uncovered(holder: Principal, limits: Sequence[Limit]) -> str | None:
    """The first permission of ``limits`` that ``holder`` does not hold on that scope, or None."""
    if holder.is_super:
        return None
    own = limits_to_wire(holder.limits)
    for limit in limits_to_wire(limits):
        for permission in limit["permissions"]:
            holding = [
                mine
                for mine in own
                if any(_permission_covers(p, permission) for p in mine["permissions"])
            ]
            if any(_is_global(scope) for mine in holding for scope in mine["scopes"]):
                continue
            agents = {
                scope["agent_uuid"]
                for mine in holding
                for scope in mine["scopes"]
                if isinstance(scope, dict) and "agent_uuid" in scope
            }
            for scope in limit["scopes"]:
                if _is_global(scope) or scope["agent_uuid"] not in agents:
                    where = "global scope" if _is_global(scope) else f"agent {scope['agent_uuid']}"
                    return f"{_short(permission)} on {where}"
    return None


def _short(permission: dict[str, Any]) -> str:
    [(category, action)] = permission.items()
    if isinstance(action, dict):
        [(verb, pattern)] = action.items()
        return f"{category}.{verb}({pattern})"
    return f"{category}.{action}"


def _may_grant(
    holder: Principal, limits: Sequence[Limit], timestamp_to: int | None, *, window: bool = True
) -> None:
    """Refuse (102) limits or a validity end beyond what ``holder`` itself has."""
    missing = uncovered(holder, limits)
    if missing is not None:
        raise PermissionDenied(
            f"Permission denied: token {holder.key} cannot grant {missing}, which it lacks"
        )
    if holder.is_super or holder.timestamp_to is None or not window:
        return
    if timestamp_to is None or timestamp_to > holder.timestamp_to:
        raise PermissionDenied(
            f"Permission denied: token {holder.key} expires at {holder.timestamp_to} "
            "and cannot grant a token valid after that"
        )


def _may_take_over(holder: Principal, row: Any, *, window: bool = True) -> None:
    """Refuse (102) acting on a token that holds more than ``holder`` (or is the super token)."""
    if holder.is_super:
        return
    if row.is_super:
        raise PermissionDenied(
            f"Permission denied: only the super token may change token {row.key}"
        )
    _may_grant(holder, parse_limits(row.limits), row.timestamp_to, window=window)


def _info(row: Any) -> dict[str, Any]:
    """A token as clients see it: never its secret or any hash."""
    return {
        "key": row.key,
        "username": row.username,
        "is_super": bool(row.is_super),
        "limits": row.limits,
        "timestamp_from": row.timestamp_from,
        "timestamp_to": row.timestamp_to,
        "max_uses": row.max_uses,
        "uses": row.uses,
        "description": row.description,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _issued(token: NewToken) -> dict[str, str]:
    return {"key": token.key, "secret": token.secret, "token": str(token)}


async def _reauthenticate(ctx: CallContext, key: str) -> None:
    """Forget token ``key``'s cached row and end the subscriptions it opened (on every node).

    A subscription is authorised once, when it is made: without this a revoked or
    rolled agent token would go on receiving tasks over its open WebSocket.
    """
    ended = await ctx.app.token_changed(key, revoke=True)

    async def close() -> None:
        # after the reply: a caller rolling its own token over this connection gets it
        for sub in ended:
            close_soon = getattr(sub.peer, "close_soon", None)
            if close_soon is not None:
                close_soon(1008)

    if ended:
        ctx.after_reply.append(close)


# --------------------------------------------------------------------------- methods


@method("token_create")
async def token_create(
    ctx: CallContext,
    token: Any,
    limits: Any,
    username: Any = None,
    password: Any = None,
    timestamp_from: Any = None,
    timestamp_to: Any = None,
    description: Any = None,
    max_uses: Any = None,
) -> dict[str, str]:
    """Create a token; its secret is returned this once and stored only hashed."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    parsed = parse_limits(limits)
    name = _username(username)
    if (name is None) != (password is None):
        raise InvalidParams("username and password: give both or neither")
    start, end = _ms(timestamp_from, "timestamp_from"), _ms(timestamp_to, "timestamp_to")
    if end is None and not principal.is_super:
        end = principal.timestamp_to  # a token cannot outlive the one that made it
    _window(start, end)
    _may_grant(principal, parsed, end)
    uses, text = _max_uses(max_uses), _text(description, "description", 256)
    new = NewToken.generate()
    values: dict[str, Any] = {
        "key": new.key,
        "secret_hash": hash_secret(new.secret),
        "limits": limits_to_wire(parsed),
        "username": name,
        "password_hash": None
        if password is None
        else await ctx.app.auth.hash_password(_password(password)),
        "timestamp_from": start,
        "timestamp_to": end,
        "max_uses": uses,
        "description": text,
    }
    await ctx.app.store.insert_token(values)
    logger.info("token %s created by token %s", new.key, principal.key)
    return _issued(new)


@method("token_get")
async def token_get(ctx: CallContext, token: Any) -> dict[str, Any]:
    """The calling token's own key, limits, window, uses and description (never its secret)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "read"))
    row = await ctx.app.store.token_by_key(principal.key)
    if row is None:  # deleted since it was cached
        raise PermissionDenied(f"Token {principal.key} was revoked")
    return _info(row)


@method("token_list_all_tokens")
async def token_list_all_tokens(ctx: CallContext, token: Any) -> list[dict[str, Any]]:
    """Every token (key, limits, window, uses, description; never a secret)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "read"))
    return [_info(row) for row in await ctx.app.store.list_tokens()]


@method("token_edit")
async def token_edit(
    ctx: CallContext,
    token: Any,
    key: Any,
    limits: Any = UNCHANGED,
    timestamp_from: Any = UNCHANGED,
    timestamp_to: Any = UNCHANGED,
    description: Any = UNCHANGED,
    max_uses: Any = UNCHANGED,
) -> dict[str, Any]:
    """Replace a token's limits, validity window, description or max_uses (omitted ones stay)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    target = _key(key)
    changes: dict[str, Any] = {}
    if limits is not UNCHANGED:
        changes["limits"] = parse_limits(limits)
    for field, value in (("timestamp_from", timestamp_from), ("timestamp_to", timestamp_to)):
        if value is not UNCHANGED:
            changes[field] = _ms(value, field)
    if description is not UNCHANGED:
        changes["description"] = _text(description, "description", 256)
    if max_uses is not UNCHANGED:
        changes["max_uses"] = _max_uses(max_uses)

    def change(row: Any) -> dict[str, Any]:
        if row.is_super and set(changes) - {"description"}:
            raise InvalidInput("The super token has no limits, window or max_uses to edit")
        _may_take_over(principal, row)
        new_limits = changes.get("limits", parse_limits(row.limits))
        start = changes.get("timestamp_from", row.timestamp_from)
        end = changes.get("timestamp_to", row.timestamp_to)
        _window(start, end)
        if not row.is_super:
            _may_grant(principal, new_limits, end)
        values = dict(changes)
        if "limits" in values:
            values["limits"] = limits_to_wire(new_limits)
        return values

    row = await ctx.app.store.update_token(target, change)
    if changes.keys() - {"description", "max_uses"}:
        await _reauthenticate(ctx, target)
    else:
        await ctx.app.token_changed(target, revoke=False)
    logger.info("token %s edited by token %s", target, principal.key)
    return _info(row)


@method("token_delete")
async def token_delete(ctx: CallContext, token: Any, key: Any) -> dict[str, bool]:
    """Revoke a token at once (the super token cannot be deleted)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "delete"))
    target = _key(key)

    def check(row: Any) -> None:
        if row.is_super:
            raise InvalidInput("The super token cannot be deleted")
        # deleting only takes power away: the holder's own window does not matter here
        _may_take_over(principal, row, window=False)

    await ctx.app.store.delete_token(target, check)
    await _reauthenticate(ctx, target)
    logger.info("token %s deleted by token %s", target, principal.key)
    return {"success": True}


@method("token_roll_token_secret")
async def token_roll_token_secret(ctx: CallContext, token: Any, key: Any = None) -> dict[str, str]:
    """Give a token (default: the caller's) a new secret; the old one stops working at once."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    target = principal.key if key is None else _key(key)
    new = NewToken(target, NewToken.generate().secret)

    def change(row: Any) -> dict[str, Any]:
        _may_take_over(principal, row)
        return {"secret_hash": hash_secret(new.secret)}

    await ctx.app.store.update_token(target, change)
    await _reauthenticate(ctx, target)
    logger.info("token %s got a new secret from token %s", target, principal.key)
    return _issued(new)


@method("token_change_password")
async def token_change_password(
    ctx: CallContext, token: Any, password: Any, key: Any = None, username: Any = None
) -> dict[str, bool]:
    """Set the password of a token (default: the caller's), and its username if given."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    target = principal.key if key is None else _key(key)
    name = _username(username)
    password_hash = await ctx.app.auth.hash_password(_password(password))

    def change(row: Any) -> dict[str, Any]:
        _may_take_over(principal, row)
        if name is None and row.username is None:
            raise InvalidInput(f"Token {row.key} has no username; give one with the password")
        values = {"password_hash": password_hash}
        if name is not None:
            values["username"] = name
        return values

    await ctx.app.store.update_token(target, change)
    await _reauthenticate(ctx, target)
    logger.info("token %s got a new password from token %s", target, principal.key)
    return {"success": True}
