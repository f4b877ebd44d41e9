"""Token methods in NodeGet's shapes: get, create, edit, delete, roll, change password, list.

Any valid token may read itself with ``token_get``. The rest needs the super
token or a global ``{"token": "read"|"write"|"delete"}`` permission (read:
``token_get`` of another token and ``token_list_all_tokens``; write: create,
edit, roll, change_password; delete: delete). A token that is not super can
never hand out or take over more than it holds itself: every (scope,
permission) pair of the token it creates, edits, rolls, re-passwords or deletes
must be covered by one of its own limits, and a token it creates, edits, rolls
or re-passwords cannot stay valid longer than it does.

A target token is named by its key or, failing that, its username; a
``KEY:SECRET`` or ``USERNAME|PASSWORD`` string names the token of its key or
username (the secret is not checked). Secrets leave the server only in the
replies of ``token_create`` and ``token_roll_token_secret``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Required

from pydantic import Field
from typing_extensions import TypedDict

from taskd.auth import Need, NewToken, Principal, authorize, hash_secret
from taskd.errors import InvalidInput, InvalidParams, NotFound, PermissionDenied
from taskd.protocol import Limit, Parse, Token, limits_to_wire, parse_limits
from taskd.rpc import CallContext, method
from taskd.store import SUPER_USERNAME

logger = logging.getLogger(__name__)

MAX_MS = (1 << 53) - 1
VERSION: Literal[1] = 1
"""The version of every token, as NodeGet stores it (a client's ``version`` is ignored)."""


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


def _text(value: Any, field: str, longest: int = 256) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > longest:
        raise InvalidParams(f"{field}: must be a string of at most {longest} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidParams(f"{field}: must not contain control characters")
    return value


def _names(value: Any, field: str = "target_token") -> tuple[str, ...]:
    """The names a target param may mean: itself, then the key or username of a credential."""
    if not isinstance(value, str) or len(value) > 512:
        raise InvalidParams(f"{field}: must be a token key or username (a string)")
    if not value.strip():
        raise InvalidInput(f"{field} cannot be empty")
    key, colon, _ = value.partition(":")
    head = key if colon else value.partition("|")[0]
    return (value, head) if head and head != value else (value,)


def _login_name(value: Any, field: str) -> str | None:
    username = _text(value, field, 128)
    if username is not None and not username.strip():
        raise InvalidParams(f"{field}: must not be empty")
    return username


def _username(value: Any, field: str) -> str | None:
    """A username for a token that is not the super token."""
    username = _login_name(value, field)
    if username == SUPER_USERNAME:
        raise InvalidInput(f"Username {SUPER_USERNAME!r} is reserved for the super token")
    return username


def _password(value: Any, field: str) -> str:
    # ':' is allowed, as in NodeGet (its dashboard generates passwords with ':'), though
    # USERNAME|PASS:WORD then reads as KEY:SECRET: such a token logs in by its key only
    if not isinstance(value, str) or not 6 <= len(value) <= 256:
        raise InvalidParams(f"{field}: must be a string of 6 to 256 characters")
    return value


def _max_uses(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MS:
        raise InvalidParams(f"{field}: must be a positive integer or null")
    return value


def _window(timestamp_from: int | None, timestamp_to: int | None) -> None:
    if timestamp_from is not None and timestamp_to is not None and timestamp_from > timestamp_to:
        raise InvalidInput("timestamp_from is after timestamp_to")


def _creation(value: Any, field: str = "token_creation") -> dict[str, Any]:
    """Check a ``token_creation`` object; unknown fields are ignored, as NodeGet (serde) does."""
    if not isinstance(value, dict):
        raise InvalidParams(
            f"{field}: must be an object with token_limit and optional username, "
            "password, timestamp_from, timestamp_to, version, description, max_uses"
        )
    if "token_limit" not in value:
        raise InvalidParams(f"{field}.token_limit: required (a list of limits, [] for none)")
    version = value.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise InvalidParams(f"{field}.version: must be an integer or null")
    username = _username(value.get("username"), f"{field}.username")
    password = value.get("password")
    if (username is None) != (password is None):
        raise InvalidParams(f"{field}.username and password: give both or neither")
    return {
        "limits": parse_limits(value["token_limit"], f"{field}.token_limit"),
        "username": username,
        "password": None if password is None else _password(password, f"{field}.password"),
        "timestamp_from": _ms(value.get("timestamp_from"), f"{field}.timestamp_from"),
        "timestamp_to": _ms(value.get("timestamp_to"), f"{field}.timestamp_to"),
        "description": _text(value.get("description"), f"{field}.description"),
        "max_uses": _max_uses(value.get("max_uses"), f"{field}.max_uses"),
    }


_Ms = Annotated[int, Field(ge=0, le=MAX_MS)] | None
_Username = Annotated[str, Field(min_length=1, max_length=128)] | None
_Password = Annotated[str, Field(min_length=6, max_length=256)]
_Description = Annotated[str, Field(max_length=256)] | None
_MaxUses = Annotated[int, Field(ge=1, le=MAX_MS)] | None


class TokenCreation(TypedDict, total=False):
    """``token_creation``: a new token's limits, and optionally its login and window."""

    token_limit: Required[list[Limit]]
    username: _Username
    password: _Password | None
    timestamp_from: _Ms
    timestamp_to: _Ms
    version: Annotated[int | None, Field(description="ignored: always 1")]
    description: _Description
    max_uses: _MaxUses


Creation = Annotated[dict[str, Any], Parse(_creation, wire=TokenCreation)]
TargetToken = Annotated[
    tuple[str, ...],
    Parse(
        _names, wire=Annotated[str, Field(min_length=1, description="a token's key or username")]
    ),
]
"""The names a target param may mean (see ``_names``)."""
Ms = Annotated[int | None, Parse(_ms, wire=_Ms)]
Description = Annotated[str | None, Parse(_text, wire=_Description)]
MaxUses = Annotated[int | None, Parse(_max_uses, wire=_MaxUses)]
Password = Annotated[str, Parse(_password, wire=_Password)]
LoginName = Annotated[str | None, Parse(_login_name, wire=_Username)]
Limits = Annotated[list[Limit], Parse(parse_limits)]


class TokenInfo(TypedDict):
    """A token as NodeGet shows it, then taskd's extras."""

    version: Literal[1]
    token_key: str
    timestamp_from: int | None
    timestamp_to: int | None
    token_limit: list[Limit]
    username: Annotated[str | None, Field(description="root for the super token")]
    is_super: bool
    description: str | None
    max_uses: int | None
    uses: int
    created_at: int
    updated_at: int


class TokenIssued(TypedDict):
    """A token's key and secret: the secret is shown this once."""

    key: str
    secret: str


class TokenList(TypedDict):
    """Every token."""

    tokens: list[TokenInfo]


class TokenEdited(TypedDict):
    """The token edited."""

    success: bool
    id: int
    token_key: str


class TokenDeleted(TypedDict):
    """The token deleted, and whether it was named by key or username."""

    message: str
    rows_affected: int
    matched_by: Annotated[str, Field(description="token_key or username: what named it")]


class PasswordChanged(TypedDict):
    """The password was changed."""

    success: bool
    message: str


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


def _scope_id(scope: Any) -> tuple[str, Any] | None:
    """A scope as (kind, value), e.g. ("agent_uuid", U); None for the global scope."""
    if _is_global(scope):
        return None
    [(kind, value)] = scope.items()
    return kind, value


def _where(scope: tuple[str, Any] | None) -> str:
    if scope is None:
        return "global scope"
    kind, value = scope
    return f"agent {value}" if kind == "agent_uuid" else f"{kind} {value}"


def uncovered(holder: Principal, limits: Sequence[Limit]) -> str | None:
    """The first permission of ``limits`` that ``holder`` does not hold on that scope, or None."""
    if holder.is_super:
        return None
    own = limits_to_wire(holder.limits)
    for limit in limits_to_wire(limits):
        for permission in limit["permissions"]:
            held = {
                _scope_id(scope)
                for mine in own
                if any(_permission_covers(p, permission) for p in mine["permissions"])
                for scope in mine["scopes"]
            }
            if None in held:  # the global scope covers every other
                continue
            for scope in map(_scope_id, limit["scopes"]):
                if scope not in held:
                    return f"{_short(permission)} on {_where(scope)}"
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


def _info(row: Any) -> TokenInfo:
    """A token as NodeGet shows it, then taskd's extras; never its secret or any hash.

    The super token shows as NodeGet's does: username ``root`` and no limits (it
    passes every check), which is how NodeGet's clients recognise it.
    """
    return {
        "version": VERSION,
        "token_key": row.key,
        "timestamp_from": row.timestamp_from,
        "timestamp_to": row.timestamp_to,
        "token_limit": [] if row.is_super else row.limits,
        "username": SUPER_USERNAME if row.is_super else row.username,
        "is_super": bool(row.is_super),
        "description": row.description,
        "max_uses": row.max_uses,
        "uses": row.uses,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _issued(token: NewToken) -> TokenIssued:
    return {"key": token.key, "secret": token.secret}


async def _reauthenticate(ctx: CallContext, key: str) -> None:
    """Forget token ``key``'s cached row and end the subscriptions it opened (on every node).

    A subscription is authorised once, when it is made: without this a revoked or
    rolled agent token would go on receiving tasks over its open WebSocket.
    """
    ended = await ctx.app.revocation.token_changed(key, revoke=True)

    async def close() -> None:
        # after the reply: a caller rolling its own token over this connection gets it
        for sub in ended:
            sub.peer.close_soon(1008)

    if ended:
        ctx.after_reply.append(close)


# --------------------------------------------------------------------------- methods


@method("token_get")
async def token_get(ctx: CallContext, token: Token, supertoken: Token | None = None) -> TokenInfo:
    """A token's key, limits, window and username (never its secret); any token may read itself.

    With ``supertoken`` (the super token, or one with ``{"token": "read"}``) ``token``
    may name any token by key or username.
    """
    if supertoken is None:
        principal = await ctx.app.authenticate(token, ctx.remote)
        row = await ctx.app.store.token_by_key(principal.key)
        if row is None:  # deleted since it was cached
            raise PermissionDenied(f"Token {principal.key} was revoked")
        return _info(row)
    principal = await ctx.app.authenticate(supertoken, ctx.remote)
    authorize(principal, Need("token", "read"))
    names = _names(token, "token")
    found = await ctx.app.store.find_token(names)
    if found is None:
        raise NotFound(f"No token with key or username {names[-1]!r}")
    return _info(found[0])


@method("token_create")
async def token_create(
    ctx: CallContext, father_token: Token, token_creation: Creation
) -> TokenIssued:
    """Create a token; its secret is returned this once and stored only hashed."""
    principal = await ctx.app.authenticate(father_token, ctx.remote)
    authorize(principal, Need("token", "write"))
    request = token_creation
    start, end = request["timestamp_from"], request["timestamp_to"]
    if end is None and not principal.is_super:
        end = principal.timestamp_to  # a token cannot outlive the one that made it
    _window(start, end)
    _may_grant(principal, request["limits"], end)
    password = request["password"]
    new = NewToken.generate()
    values: dict[str, Any] = {
        "key": new.key,
        "secret_hash": hash_secret(new.secret),
        "limits": limits_to_wire(request["limits"]),
        "username": request["username"],
        "password_hash": None if password is None else await ctx.app.auth.hash_password(password),
        "timestamp_from": start,
        "timestamp_to": end,
        "max_uses": request["max_uses"],
        "description": request["description"],
    }
    await ctx.app.store.insert_token(values)
    logger.info("token %s created by token %s", new.key, principal.key)
    return _issued(new)


@method("token_list_all_tokens")
async def token_list_all_tokens(ctx: CallContext, token: Token) -> TokenList:
    """Every token as ``token_get`` shows it (never a secret), oldest first."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "read"))
    return {"tokens": [_info(row) for row in await ctx.app.store.list_tokens()]}


@method("token_edit")
async def token_edit(
    ctx: CallContext,
    token: Token,
    target_token: TargetToken,
    limit: Limits = UNCHANGED,
    timestamp_from: Ms = UNCHANGED,
    timestamp_to: Ms = UNCHANGED,
    description: Description = UNCHANGED,
    max_uses: MaxUses = UNCHANGED,
) -> TokenEdited:
    """Replace a token's limits (and taskd's window, description, max_uses; omitted ones stay)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    given: dict[str, Any] = {
        "limits": limit,
        "timestamp_from": timestamp_from,
        "timestamp_to": timestamp_to,
        "description": description,
        "max_uses": max_uses,
    }
    changes = {field: value for field, value in given.items() if value is not UNCHANGED}

    def change(row: Any) -> dict[str, Any]:
        _may_take_over(principal, row)
        if row.is_super and set(changes) - {"description"}:
            raise InvalidInput(
                "The super token passes every check: it has no limits, window or max_uses to edit"
            )
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

    row = await ctx.app.store.update_token(target_token, change)
    if changes.keys() - {"description", "max_uses"}:
        await _reauthenticate(ctx, row.key)
    else:
        await ctx.app.revocation.token_changed(row.key, revoke=False)
    logger.info("token %s edited by token %s", row.key, principal.key)
    return {"success": True, "id": row.id, "token_key": row.key}


@method("token_delete")
async def token_delete(ctx: CallContext, token: Token, target_token: TargetToken) -> TokenDeleted:
    """Revoke a token (by key, else username) at once; the super token cannot be deleted."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "delete"))

    def check(row: Any) -> None:
        if row.is_super:
            raise PermissionDenied("The super token cannot be deleted")
        # deleting only takes power away: the holder's own window does not matter here
        _may_take_over(principal, row, window=False)

    row, matched_by = await ctx.app.store.delete_token(target_token, check)
    await _reauthenticate(ctx, row.key)
    logger.info("token %s deleted by token %s", row.key, principal.key)
    return {
        "message": f"Token {row.key} deleted successfully by token {principal.key}",
        "rows_affected": 1,
        "matched_by": matched_by,
    }


@method("token_roll_token_secret")
async def token_roll_token_secret(
    ctx: CallContext, token: Token, target_token: TargetToken | None = None
) -> TokenIssued:
    """Give a token (default: the caller) a new secret; the old one stops working at once."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    names = (principal.key,) if target_token is None else target_token
    secret = NewToken.generate().secret

    def change(row: Any) -> dict[str, Any]:
        _may_take_over(principal, row)
        return {"secret_hash": hash_secret(secret)}

    row = await ctx.app.store.update_token(names, change)
    await _reauthenticate(ctx, row.key)
    logger.info("token %s got a new secret from token %s", row.key, principal.key)
    return _issued(NewToken(row.key, secret))


@method("token_change_password")
async def token_change_password(
    ctx: CallContext,
    token: Token,
    target_token: TargetToken,
    new_password: Password,
    username: LoginName = None,
) -> PasswordChanged:
    """Set a token's password (and its username, if given: taskd extension)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("token", "write"))
    password_hash = await ctx.app.auth.hash_password(new_password)

    def change(row: Any) -> dict[str, Any]:
        _may_take_over(principal, row)
        values = {"password_hash": password_hash}
        if row.is_super:  # its username is fixed: the one NodeGet's clients know it by
            if username not in (None, SUPER_USERNAME):
                raise InvalidInput(f"The super token's username is always {SUPER_USERNAME!r}")
            values["username"] = SUPER_USERNAME
        elif username == SUPER_USERNAME:
            raise InvalidInput(f"Username {SUPER_USERNAME!r} is reserved for the super token")
        elif username is not None:
            values["username"] = username
        elif row.username is None:
            raise InvalidInput(
                f"Token {row.key} has no username to log in with; give one with the password"
            )
        return values

    row = await ctx.app.store.update_token(target_token, change)
    await _reauthenticate(ctx, row.key)
    logger.info("token %s got a new password from token %s", row.key, principal.key)
    return {"success": True, "message": "Password changed successfully"}
