"""Alert events as people and scripts see them: the query, the wire shape, the messages.

An event starts when a rule's condition starts on an agent and resolves when it
ends. Each start, reminder and resolution is one delivery per channel of the
rule (the outbox, ``alert_delivery``); the notifier turns what is due for one
channel into one message, or one summary when many are due at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from taskd.alerts.rules import parse_name
from taskd.errors import InvalidParams
from taskd.protocol import DEFAULT_QUERY_LIMIT, canonical_uuid, variant_tag

MAX_EVENT_LIMIT = 10_000
SUMMARY_LINES = 20
"""Events listed one by one in a summary message; the rest are counted."""


@dataclass
class EventQuery:
    """What ``alert_event_query`` asks for (all conditions ANDed)."""

    rules: list[str] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)
    firing: bool = False
    resolved: bool = False
    started_from: int | None = None
    started_to: int | None = None
    limit: int = DEFAULT_QUERY_LIMIT


def _ms(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParams(f"{field}: must be a timestamp in ms (an integer from 0)")
    return value


def parse_event_query(value: Any, field: str = "query") -> EventQuery:
    """``{"condition": [...]}``: ``{"rule"}``, ``{"uuid"}``, ``"is_firing"``, ``"is_resolved"``,
    ``{"timestamp_from_to": [a, b]}`` (on the start), ``{"limit": n}``, ``"last"``."""
    if not isinstance(value, dict) or not isinstance(value.get("condition"), list):
        raise InvalidParams(f'{field}: must be {{"condition": [...]}}')
    conditions = value["condition"]
    if len(conditions) > 1000:
        raise InvalidParams(f"{field}.condition: more than 1000 conditions")
    query = EventQuery()
    last = False
    for index, item in enumerate(conditions):
        where = f"{field}.condition.{index}"
        tag = variant_tag(item)
        flag = isinstance(item, str) or (isinstance(item, dict) and item.get(tag) is None)
        if tag in ("is_firing", "is_resolved", "last") and flag:
            if tag == "is_firing":
                query.firing = True
            elif tag == "is_resolved":
                query.resolved = True
            else:
                last = True
            continue
        if not isinstance(item, dict) or tag is None:
            raise InvalidParams(
                f"{where}: unknown condition {item!r}; expected one of rule, uuid, is_firing, "
                "is_resolved, timestamp_from_to, limit, last"
            )
        argument = item[tag]
        if tag == "rule":
            query.rules.append(parse_name(argument, f"{where}.rule"))
        elif tag == "uuid":
            try:
                query.uuids.append(canonical_uuid(argument))
            except (TypeError, ValueError, AttributeError):
                raise InvalidParams(f"{where}.uuid: must be an agent UUID") from None
        elif tag == "timestamp_from_to":
            if not isinstance(argument, list) or len(argument) != 2:
                raise InvalidParams(f"{where}.timestamp_from_to: must be [from, to]")
            low = _ms(argument[0], f"{where}.timestamp_from_to.0")
            high = _ms(argument[1], f"{where}.timestamp_from_to.1")
            query.started_from = max(low, query.started_from or 0)
            query.started_to = high if query.started_to is None else min(high, query.started_to)
        elif tag == "limit":
            if isinstance(argument, bool) or not isinstance(argument, int):
                raise InvalidParams(f"{where}.limit: must be an integer")
            if not 0 <= argument <= MAX_EVENT_LIMIT:
                raise InvalidParams(f"{where}.limit: must be between 0 and {MAX_EVENT_LIMIT}")
            query.limit = argument
        else:
            raise InvalidParams(
                f"{where}: unknown condition {tag!r}; expected one of rule, uuid, is_firing, "
                "is_resolved, timestamp_from_to, limit, last"
            )
    if last:
        query.limit = 1
    return query


def event_to_wire(row: Any, deliveries: Sequence[Any] = ()) -> dict[str, Any]:
    """An event row as the wire shows it, with the state of its deliveries."""
    return {
        "id": row.id,
        "rule": row.rule,
        "uuid": row.uuid,
        "state": row.state,
        "started_at": row.started_at,
        "resolved_at": row.resolved_at,
        "message": row.message,
        "deliveries": [
            {
                "channel": d.channel,
                "kind": d.kind,
                "state": ("pending", "sent", "failed")[d.state],
                "attempts": d.attempts,
                "sent_at": d.sent_at,
                "last_error": d.last_error,
            }
            for d in deliveries
        ],
    }


def duration(ms: int) -> str:
    """A duration in words: ``2 h 5 min``, ``1 min 30 s``, ``12 s``, ``850 ms``."""
    if ms < 1000:
        return f"{max(ms, 0)} ms"
    seconds = ms // 1000
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n][:2]
    return " ".join(shown)


@dataclass(frozen=True)
class Due:
    """One delivery due for a channel, with its event as it is now."""

    id: int
    kind: str
    """``start``, ``remind`` or ``resolve``."""
    rule: str
    uuid: str
    started_at: int
    resolved_at: int | None
    message: str

    def line(self, now: int) -> str:
        """One line about this delivery."""
        if self.kind == "resolve":
            lasted = duration((self.resolved_at or now) - self.started_at)
            return f"RESOLVED after {lasted}: {self.message}"
        if self.kind == "remind":
            return f"STILL FIRING for {duration(now - self.started_at)}: {self.message}"
        return f"FIRING: {self.message}"


def compose(due: Sequence[Due], now: int) -> tuple[str, str]:
    """The title and body of the one message that carries ``due``."""
    if len(due) == 1:
        item = due[0]
        title = {
            "start": f"[taskd] {item.rule} firing on {item.uuid}",
            "remind": f"[taskd] {item.rule} still firing on {item.uuid}",
            "resolve": f"[taskd] {item.rule} resolved on {item.uuid}",
        }[item.kind]
        return title, item.line(now)
    counts = {kind: sum(d.kind == kind for d in due) for kind in ("start", "remind", "resolve")}
    said = [
        f"{counts['start']} firing" if counts["start"] else "",
        f"{counts['remind']} still firing" if counts["remind"] else "",
        f"{counts['resolve']} resolved" if counts["resolve"] else "",
    ]
    title = f"[taskd] {len(due)} alerts: " + ", ".join(s for s in said if s)
    lines = [d.line(now) for d in due[:SUMMARY_LINES]]
    if len(due) > SUMMARY_LINES:
        lines.append(f"... and {len(due) - SUMMARY_LINES} more (alert_event_query lists them)")
    return title, "\n".join(lines)
