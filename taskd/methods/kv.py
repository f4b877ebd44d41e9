"""KV methods: NodeGet's key-value store, in NodeGet's shapes (``kv_*``).

A namespace holds keys whose values are any JSON. It exists while it holds a
key: ``kv_create`` (super token only) stores the key ``__nodeget_namespace_marker__``
with a null value, which is visible and deletable like any other key, as in NodeGet.

Permissions hold on a ``{"kv_namespace": "<name>"}`` scope or the global one:
``{"kv": "list_all_namespace"}``, ``{"kv": "list_all_keys"}`` and
``{"kv": {"read"|"write"|"delete": "<key pattern>"}}``, a pattern being a key,
``*`` or a prefix ending in ``*``. taskd differs from NodeGet in two answers:
an operation on a namespace that does not exist is 105 (NodeGet: 103), and
``kv_get_multi_value`` with an empty list answers ``[]`` (NodeGet: 108), which
is what NodeGet-board's node list expects when no agent has a namespace yet.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field
from typing_extensions import TypedDict

from taskd.auth import Need, allows, authorize
from taskd.errors import PermissionDenied
from taskd.protocol import (
    KvKey,
    KvNamespace,
    KvNamespaceKeys,
    KvNamespaceScope,
    KvValue,
    Token,
)
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)


class KvCreated(TypedDict):
    """The namespace created, still empty."""

    namespace: str
    kv: dict[str, Any]


class KvItem(TypedDict):
    """One answer of kv_get_multi_value."""

    namespace: str
    key: str
    value: Any


class KvDone(TypedDict):
    """A write or delete went through."""

    success: Literal[True]


NAMESPACE_MARKER = "__nodeget_namespace_marker__"
"""The key ``kv_create`` stores: a namespace exists while it holds a key."""


@method("kv_create")
async def kv_create(ctx: CallContext, token: Token, namespace: KvNamespace) -> KvCreated:
    """Create a namespace (super token only); 108 if it exists."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    if not principal.is_super:
        raise PermissionDenied(
            f"Permission denied: only the super token can create a KV namespace "
            f"(token {principal.key} is not it)"
        )
    await ctx.app.store.kv_create(namespace, NAMESPACE_MARKER)
    logger.info("KV namespace %r created", namespace)
    return {"namespace": namespace, "kv": {}}


@method("kv_list_all_namespace")
async def kv_list_all_namespace(ctx: CallContext, token: Token) -> list[str]:
    """The namespaces the token may list (kv.list_all_namespace), sorted."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    need = Need("kv", "list_all_namespace")
    namespaces = await ctx.app.store.kv_namespaces()
    if allows(principal, need, None):
        return namespaces
    scoped = {
        scope.kv_namespace
        for limit in principal.limits
        for scope in limit.scopes
        if isinstance(scope, KvNamespaceScope)
    }
    allowed = {name for name in scoped if allows(principal, need, None, namespace=name)}
    if not allowed:
        authorize(principal, need)  # raises, naming what is missing
    return [name for name in namespaces if name in allowed]


@method("kv_get_value")
async def kv_get_value(
    ctx: CallContext, token: Token, namespace: KvNamespace, key: KvKey
) -> Annotated[Any, Field(description="the JSON value, null if the key does not exist")]:
    """The value of a key; null if the key does not exist (105 if the namespace does not)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("kv", "read", key), namespace=namespace)
    return await ctx.app.store.kv_get(namespace, key)


@method("kv_get_multi_value")
async def kv_get_multi_value(
    ctx: CallContext, token: Token, namespace_key: KvNamespaceKeys
) -> list[KvItem]:
    """``[{namespace, key, value}]`` in request order; a ``prefix*`` key gives every key it
    matches (sorted), an exact key its value or null. All items need kv.read, or none is read."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    items = namespace_key
    for name, pattern in items:
        authorize(principal, Need("kv", "read", pattern), namespace=name)
    if not items:
        return []
    exact = [(name, key) for name, key in items if not key.endswith("*")]
    prefixed = [(name, key[:-1]) for name, key in items if key.endswith("*")]
    values, matched = await ctx.app.store.kv_get_many(exact, prefixed)
    answer: list[KvItem] = []
    for name, key in items:
        if not key.endswith("*"):
            answer.append({"namespace": name, "key": key, "value": values.get((name, key))})
            continue
        prefix = key[:-1]
        answer.extend(
            {"namespace": name, "key": found, "value": value}
            for found, value in matched.get(name, [])
            if found.startswith(prefix)
        )
    return answer


@method("kv_set_value")
async def kv_set_value(
    ctx: CallContext, token: Token, namespace: KvNamespace, key: KvKey, value: KvValue
) -> KvDone:
    """Store any JSON value (up to 1 MiB) under a key of an existing namespace."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("kv", "write", key), namespace=namespace)
    await ctx.app.store.kv_set(namespace, key, value)
    return {"success": True}


@method("kv_delete_key")
async def kv_delete_key(
    ctx: CallContext, token: Token, namespace: KvNamespace, key: KvKey
) -> KvDone:
    """Delete a key (success also if it did not exist); 105 if the namespace does not exist."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("kv", "delete", key), namespace=namespace)
    await ctx.app.store.kv_delete(namespace, key)
    return {"success": True}


@method("kv_get_all_keys")
async def kv_get_all_keys(ctx: CallContext, token: Token, namespace: KvNamespace) -> list[str]:
    """Every key of a namespace, sorted, its marker included (kv.list_all_keys)."""
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("kv", "list_all_keys"), namespace=namespace)
    return await ctx.app.store.kv_keys(namespace)
