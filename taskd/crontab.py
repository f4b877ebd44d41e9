"""Crons: expressions and names validated, fire times computed by croniter, stored definitions.

croniter is the one source of truth for when a cron fires: validation, the
next slot and previews all ask it, and nothing else interprets an expression.
Accepted forms::

    sec min hour dom month dow          6 fields
    sec min hour dom month dow year     7 fields
    min hour dom month dow              classic 5 fields, fires at second 0
    @yearly @annually @monthly @weekly @daily @midnight @hourly

Day of week: 0 or 7 is Sunday (or ``sun`` .. ``sat``). When both day of month
and day of week are restricted, a day matching EITHER fires (standard cron).
Times are wall-clock times in the configured timezone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from taskd.errors import InvalidCronExpression, InvalidInput, InvalidParams
from taskd.protocol import CRON_TYPE, AgentCron

MAX_EXPRESSION_LENGTH = 256
MAX_NAME_LENGTH = 128
MAX_YEARS_AHEAD = 130
SHORTHANDS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")

# field name and what it accepts, in the order of the 6/7-field form
_FIELDS = (
    ("second", "0-59"),
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31, L, nW or ?"),
    ("month", "1-12 or jan-dec"),
    ("day of week", "0-7 (0 and 7 are Sunday), sun-sat, n#k, Ln or ?"),
    ("year", "1970-2099"),
)
_RANDOM_OR_HASHED = re.compile(r"^[hr](?:\(|/|$)", re.IGNORECASE)
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_SEPARATORS = re.compile(r"[ \t\r\n]+")


class CronSchedule:
    """A validated cron expression, evaluated in one timezone."""

    def __init__(self, expression: str, zone: tzinfo, *, with_seconds: bool) -> None:
        self.expression = expression
        self.zone = zone
        self.with_seconds = with_seconds
        # one croniter per schedule: constructing it parses the expression again
        self._iter = croniter(
            expression,
            datetime.now(zone),
            ret_type=datetime,
            day_or=True,
            second_at_beginning=with_seconds,
            # croniter gives up after 50 years by default; the year field reaches 2099
            max_years_between_matches=MAX_YEARS_AHEAD,
        )

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, {self.zone})"

    def next_after(self, when: datetime) -> datetime | None:
        """The first slot strictly after ``when``; None if the expression never fires again."""
        try:
            result: datetime = self._iter.get_next(datetime, start_time=when.astimezone(self.zone))
        except CroniterBadDateError:
            return None
        return result

    def latest_at_or_before(self, when: datetime) -> datetime | None:
        """The last slot at or before ``when``; None if there is none."""
        # croniter's previous slot is strictly before its start: start one second later
        start = when.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        try:
            result: datetime = self._iter.get_prev(datetime, start_time=start.astimezone(self.zone))
        except CroniterBadDateError:
            return None
        return result

    def next_times(self, after: datetime, count: int) -> list[datetime]:
        """Up to ``count`` slots after ``after`` (a preview)."""
        times: list[datetime] = []
        when: datetime | None = after
        while when is not None and len(times) < count:
            when = self.next_after(when)
            if when is not None:
                times.append(when)
        return times


def zone_of(name: str) -> tzinfo:
    """The timezone called ``name`` (an IANA name such as ``Europe/Berlin``)."""
    try:
        return ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        raise InvalidInput(f"Unknown timezone {name!r}") from None


def _invalid(text: str, reason: str) -> InvalidCronExpression:
    return InvalidCronExpression(f"Invalid cron expression {text!r}: {reason}")


def _croniter_reason(exc: Exception) -> str:
    # croniter repeats the whole expression in brackets; the caller already shows it
    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", message)


def _field_at_fault(fields: list[str], names: list[tuple[str, str]]) -> str | None:
    """Name the first field that croniter rejects on its own (all others ``*``)."""
    for index, value in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[index] = value
        try:
            croniter.expand(" ".join(probe), second_at_beginning=len(fields) > 5)
        except (CroniterError, ValueError, TypeError, KeyError, IndexError):
            name, accepts = names[index]
            return f"bad {name} field {value!r} (accepts {accepts}, lists, ranges and steps)"
    return None


def parse_expression(text: object, zone: tzinfo | str = "UTC") -> CronSchedule:
    """Validate a cron expression; raise InvalidCronExpression (101) with the reason."""
    if not isinstance(text, str):
        raise InvalidParams("cron_expression: must be a string")
    if isinstance(zone, str):
        zone = zone_of(zone)
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise _invalid(text[:40] + "...", f"longer than {MAX_EXPRESSION_LENGTH} characters")
    # ASCII whitespace only, like croniter: a no-break space is no field separator
    fields = [field for field in _SEPARATORS.split(text) if field]
    if not fields:
        raise _invalid(text, "it is empty")
    if any(not _PRINTABLE.match(field) for field in fields):
        raise _invalid(text, "only printable ASCII characters are allowed")
    expression = " ".join(fields)
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0].lower() not in SHORTHANDS:
            raise _invalid(text, f"unknown shorthand; expected one of {', '.join(SHORTHANDS)}")
        with_seconds = False
        names = list(_FIELDS[1:6])
    elif len(fields) == 5:
        with_seconds = False
        names = list(_FIELDS[1:6])
    elif len(fields) in (6, 7):
        with_seconds = True
        names = list(_FIELDS[: len(fields)])
    else:
        raise _invalid(
            text,
            f"expected 6 fields (sec min hour dom month dow), 7 (with year), "
            f"the classic 5 (min hour dom month dow) or a @shorthand, not {len(fields)}",
        )
    for field in fields:
        if any(_RANDOM_OR_HASHED.match(part) for part in field.split(",")):
            raise _invalid(text, f"random (R) and hashed (H) values are not supported: {field!r}")
    try:
        schedule = CronSchedule(expression, zone, with_seconds=with_seconds)
    except (CroniterError, ValueError, TypeError, KeyError, IndexError) as exc:
        reason = None if fields[0].startswith("@") else _field_at_fault(fields, names)
        raise _invalid(text, reason or _croniter_reason(exc)) from None
    if schedule.next_after(datetime.now(UTC)) is None:
        raise _invalid(text, "it never fires again")
    return schedule


def validate_name(name: object) -> str:
    """Check a cron name: non-empty, at most 128 characters, no slashes or control characters."""
    if not isinstance(name, str):
        raise InvalidParams("name: must be a string")
    if not name:
        raise InvalidInput("name: must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"name: longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise InvalidInput("name: must not contain '/' or '\\'")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise InvalidInput("name: must not contain control characters")
    return name


def stored_agent_cron(cron_type: Any) -> AgentCron | None:
    """The agent cron a stored ``cron_type`` holds; None for any other kind."""
    definition = CRON_TYPE.validate_python(cron_type)
    return definition if isinstance(definition, AgentCron) else None


def cron_targets(cron_type: Any) -> list[str]:
    """The agents a stored ``cron_type`` creates tasks on."""
    definition = stored_agent_cron(cron_type)
    return definition.uuids if definition is not None else []
