"""Alert methods (taskd extension, PROTOCOL.md section 13): channels, rules, events.

Every method needs ``{"alert": "read"}`` (list, query) or ``{"alert": "write"}``
(create, edit, delete, test) on the global scope. A channel's URL goes in and is
never given back: lists show the form Apprise prints with privacy on (passwords,
tokens and secret-looking query values masked), and logs name channels only.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field
from typing_extensions import TypedDict

from taskd.alerts.channels import inspect
from taskd.alerts.events import EventQuery, event_to_wire, parse_event_query
from taskd.alerts.notifier import send_test
from taskd.alerts.rules import METRIC_FIELDS, Rule, parse_name, parse_rule, rule_from_row
from taskd.auth import Need, authorize
from taskd.errors import TaskdError
from taskd.protocol import Parse, Token
from taskd.rpc import CallContext, method

logger = logging.getLogger(__name__)

TEST_TIMEOUT_MS = 20_000


class AlertCreated(TypedDict):
    """The id of what was created."""

    id: int


class AlertDone(TypedDict):
    """The change went through."""

    success: Literal[True]


class AlertChannel(TypedDict):
    """A channel as listed: its URL with every secret masked."""

    id: int
    name: str
    scheme: str
    url_redacted: str


class ChannelTestFailed(TaskdError):
    """A channel did not take the test message."""


def _name(value: Any, field: str) -> str:
    return parse_name(value, field)


def _url(value: Any, field: str) -> str:
    return inspect(value, field).url


def _rule(value: Any, field: str) -> Rule:
    return parse_rule(value, field)


def _query(value: Any, field: str) -> EventQuery:
    return parse_event_query(value, field)


_NameText = Annotated[str, Field(min_length=1, max_length=128)]
Name = Annotated[str, Parse(_name, wire=_NameText)]
ChannelUrl = Annotated[
    str,
    Parse(
        _url,
        wire=Annotated[
            str, Field(description="an Apprise URL: json://, mailto://, tgram://, slack:// ...")
        ],
    ),
]


class _RuleWire(TypedDict, total=False):
    name: _NameText
    kind: Literal["agent_offline", "probe_failed", "probe_latency", "metric"]
    targets: Annotated[list[str] | Literal["all"], Field(description='agent UUIDs or "all"')]
    params: Annotated[
        dict[str, Any],
        Field(
            description="agent_offline {grace_ms}; probe_failed {cron, consecutive}; "
            "probe_latency {cron, above_ms, consecutive}; metric {field, above|below, for_ms} "
            "with field one of " + ", ".join(METRIC_FIELDS)
        ),
    ]
    channels: list[_NameText]
    enable: bool
    remind_ms: int


class _QueryWire(TypedDict):
    condition: Annotated[
        list[Any],
        Field(
            description='{"rule": name}, {"uuid": agent}, "is_firing", "is_resolved", '
            '{"timestamp_from_to": [a, b]}, {"limit": n}, "last"'
        ),
    ]


RuleParam = Annotated[Rule, Parse(_rule, wire=_RuleWire)]
QueryParam = Annotated[EventQuery, Parse(_query, wire=_QueryWire)]


async def _allowed(ctx: CallContext, token: str, action: Literal["read", "write"]) -> str:
    principal = await ctx.app.authenticate(token, ctx.remote)
    authorize(principal, Need("alert", action))
    return principal.key


# --------------------------------------------------------------------------- channels


@method("alert_channel_create")
async def alert_channel_create(
    ctx: CallContext, token: Token, name: Name, url: ChannelUrl
) -> AlertCreated:
    """Create a channel (an Apprise URL); 108 if the name is taken."""
    key = await _allowed(ctx, token, "write")
    channel_id = await ctx.app.store.insert_alert_channel(name, url)
    logger.info("alert channel %r (%s://) created by token %s", name, inspect(url).scheme, key)
    return {"id": channel_id}


@method("alert_channel_list")
async def alert_channel_list(ctx: CallContext, token: Token) -> list[AlertChannel]:
    """Every channel, by name, its URL redacted."""
    await _allowed(ctx, token, "read")
    listed: list[AlertChannel] = []
    for row in await ctx.app.store.alert_channels():
        channel = inspect(row.url)
        listed.append(
            {
                "id": row.id,
                "name": row.name,
                "scheme": channel.scheme,
                "url_redacted": channel.redacted,
            }
        )
    return listed


@method("alert_channel_edit")
async def alert_channel_edit(
    ctx: CallContext, token: Token, name: Name, url: ChannelUrl
) -> AlertDone:
    """Give a channel a new URL; 105 if none has that name."""
    key = await _allowed(ctx, token, "write")
    await ctx.app.store.update_alert_channel(name, url)
    logger.info("alert channel %r edited by token %s", name, key)
    return {"success": True}


@method("alert_channel_delete")
async def alert_channel_delete(ctx: CallContext, token: Token, name: Name) -> AlertDone:
    """Delete a channel; 105 if none has that name, 108 while a rule sends to it."""
    key = await _allowed(ctx, token, "write")
    await ctx.app.store.delete_alert_channel(name)
    logger.info("alert channel %r deleted by token %s", name, key)
    return {"success": True}


@method("alert_channel_test")
async def alert_channel_test(ctx: CallContext, token: Token, name: Name) -> AlertDone:
    """Send a test message to a channel now; 999 naming the reason if it was not taken."""
    await _allowed(ctx, token, "write")
    row = await ctx.app.store.alert_channel(name)
    error = await send_test(row.url, name, TEST_TIMEOUT_MS)
    if error is not None:
        logger.warning("test message to alert channel %r failed: %s", name, error)
        raise ChannelTestFailed(f"Test message to alert channel {name!r} failed: {error}")
    return {"success": True}


# --------------------------------------------------------------------------- rules


@method("alert_rule_create")
async def alert_rule_create(ctx: CallContext, token: Token, rule: RuleParam) -> AlertCreated:
    """Create a rule; 108 if its name is taken or a channel it names does not exist."""
    key = await _allowed(ctx, token, "write")
    rule_id = await ctx.app.store.insert_alert_rule(rule.row())
    ctx.app.alerts.rules_changed()
    logger.info("alert rule %r (%s) created by token %s", rule.name, rule.kind, key)
    return {"id": rule_id}


@method("alert_rule_list")
async def alert_rule_list(
    ctx: CallContext, token: Token
) -> Annotated[list[dict[str, Any]], Field(description="every rule, with its id")]:
    """Every rule, by id."""
    await _allowed(ctx, token, "read")
    return [rule_from_row(row).to_wire() for row in await ctx.app.store.alert_rules()]


@method("alert_rule_edit")
async def alert_rule_edit(ctx: CallContext, token: Token, name: Name, rule: RuleParam) -> AlertDone:
    """Replace the rule named ``name`` (``rule.name`` may rename it); 105 if none."""
    key = await _allowed(ctx, token, "write")
    await ctx.app.store.update_alert_rule(name, rule.row())
    ctx.app.alerts.rules_changed()
    logger.info("alert rule %r edited by token %s", name, key)
    return {"success": True}


@method("alert_rule_delete")
async def alert_rule_delete(ctx: CallContext, token: Token, name: Name) -> AlertDone:
    """Delete a rule (its firing events end silently; the history stays); 105 if none."""
    key = await _allowed(ctx, token, "write")
    await ctx.app.store.delete_alert_rule(name)
    ctx.app.alerts.rules_changed()
    logger.info("alert rule %r deleted by token %s", name, key)
    return {"success": True}


# --------------------------------------------------------------------------- events


@method("alert_event_query")
async def alert_event_query(
    ctx: CallContext, token: Token, query: QueryParam
) -> Annotated[list[dict[str, Any]], Field(description="events, newest first")]:
    """Events matching every condition, newest first, each with its deliveries."""
    await _allowed(ctx, token, "read")
    found = await ctx.app.store.query_alert_events(
        rules=query.rules,
        uuids=query.uuids,
        firing=query.firing,
        resolved=query.resolved,
        started_from=query.started_from,
        started_to=query.started_to,
        limit=query.limit,
    )
    return [event_to_wire(row, deliveries) for row, deliveries in found]
