"""Cron expressions: the accepted forms, day-of-week and DOM/DOW rules, DST, errors, names."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from taskd.crontab import CronSchedule, parse_expression, validate_name
from taskd.errors import InvalidCronExpression, InvalidInput, InvalidParams

START = datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)  # a Sunday
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def upcoming(
    expression: str, count: int = 4, start: datetime = START, zone: str = "UTC"
) -> list[str]:
    """The next ``count`` fire times after ``start`` as ISO strings in the zone."""
    return [t.isoformat() for t in parse_expression(expression, zone).next_times(start, count)]


def croniter_says(
    expression: str, count: int = 4, start: datetime = START, seconds_first: bool = True
) -> list[str]:
    """croniter's own answer, asked directly, with seconds as the first field."""
    it = croniter(expression, start, ret_type=datetime, second_at_beginning=seconds_first)
    return [it.get_next().isoformat() for _ in range(count)]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        (
            "30 15 10 * * *",
            [
                "2026-03-02T10:15:30+00:00",
                "2026-03-03T10:15:30+00:00",
                "2026-03-04T10:15:30+00:00",
                "2026-03-05T10:15:30+00:00",
            ],
        ),
        (
            "*/20 * * * * *",
            [
                "2026-03-01T12:00:20+00:00",
                "2026-03-01T12:00:40+00:00",
                "2026-03-01T12:01:00+00:00",
                "2026-03-01T12:01:20+00:00",
            ],
        ),
        (
            "0 0 12 1 1 * 2030-2031",
            ["2030-01-01T12:00:00+00:00", "2031-01-01T12:00:00+00:00"],
        ),
        (
            "5 0 0 29 2 * 2028",
            ["2028-02-29T00:00:05+00:00"],
        ),
    ],
)
def test_six_and_seven_fields_put_seconds_first(expression: str, expected: list[str]) -> None:
    """6 fields are sec min hour dom month dow; a 7th is the year; croniter agrees."""
    assert upcoming(expression) == expected
    assert croniter_says(expression, len(expected)) == expected


def test_classic_five_fields_fire_at_second_zero() -> None:
    """The 5-field form is min hour dom month dow and fires at second 0."""
    assert upcoming("15 10 * * *", 2) == ["2026-03-02T10:15:00+00:00", "2026-03-03T10:15:00+00:00"]
    assert upcoming("*/30 * * * *", 2) == ["2026-03-01T12:30:00+00:00", "2026-03-01T13:00:00+00:00"]
    assert upcoming("15 10 * * *", 2) == croniter_says("15 10 * * *", 2, seconds_first=False)


@pytest.mark.parametrize(
    ("shorthand", "first", "second"),
    [
        ("@yearly", "2027-01-01T00:00:00+00:00", "2028-01-01T00:00:00+00:00"),
        ("@annually", "2027-01-01T00:00:00+00:00", "2028-01-01T00:00:00+00:00"),
        ("@monthly", "2026-04-01T00:00:00+00:00", "2026-05-01T00:00:00+00:00"),
        ("@weekly", "2026-03-08T00:00:00+00:00", "2026-03-15T00:00:00+00:00"),
        ("@daily", "2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00"),
        ("@midnight", "2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00"),
        ("@hourly", "2026-03-01T13:00:00+00:00", "2026-03-01T14:00:00+00:00"),
        ("@HOURLY", "2026-03-01T13:00:00+00:00", "2026-03-01T14:00:00+00:00"),
    ],
)
def test_shorthands(shorthand: str, first: str, second: str) -> None:
    """Each @shorthand fires at second 0 of its period (weekly: Sunday midnight)."""
    assert upcoming(shorthand, 2) == [first, second]
    assert upcoming(shorthand, 2) == croniter_says(shorthand, 2, seconds_first=False)


def test_sunday_is_zero_or_seven() -> None:
    """Day of week 0, 7 and sun all mean Sunday; 5-7 is Friday to Sunday."""
    sundays = ["2026-03-08T09:00:00+00:00", "2026-03-15T09:00:00+00:00"]
    assert upcoming("0 0 9 * * 0", 2) == sundays
    assert upcoming("0 0 9 * * 7", 2) == sundays
    assert upcoming("0 0 9 * * sun", 2) == sundays
    assert upcoming("0 9 * * 7", 2) == sundays
    assert upcoming("0 0 9 * * 5-7", 3) == [
        "2026-03-06T09:00:00+00:00",
        "2026-03-07T09:00:00+00:00",
        "2026-03-08T09:00:00+00:00",
    ]
    assert [datetime.fromisoformat(t).isoweekday() for t in upcoming("0 0 9 * * 1", 3)] == [1] * 3


def test_day_of_month_or_day_of_week() -> None:
    """With both restricted a day matching EITHER fires; with one restricted, only that one."""
    either = upcoming("0 0 12 13 * 5", 4)
    assert either == [
        "2026-03-06T12:00:00+00:00",  # a Friday
        "2026-03-13T12:00:00+00:00",  # the 13th (also a Friday)
        "2026-03-20T12:00:00+00:00",
        "2026-03-27T12:00:00+00:00",
    ]
    assert upcoming("0 0 12 13 * 5", 7)[-3:] == [
        "2026-04-03T12:00:00+00:00",
        "2026-04-10T12:00:00+00:00",
        "2026-04-13T12:00:00+00:00",  # a Monday: matched by day of month alone
    ]
    assert upcoming("0 0 12 13 * *", 2) == [
        "2026-03-13T12:00:00+00:00",
        "2026-04-13T12:00:00+00:00",
    ]
    assert upcoming("0 0 12 13 * ?", 2) == upcoming("0 0 12 13 * *", 2)
    assert upcoming("0 0 12 * * 5", 2) == ["2026-03-06T12:00:00+00:00", "2026-03-13T12:00:00+00:00"]


def test_berlin_spring_forward() -> None:
    """Europe/Berlin skips 02:00-03:00 on 29 March 2026: a daily 02:30 fires at 03:00 that day."""
    start = datetime(2026, 3, 28, 12, tzinfo=BERLIN)
    assert upcoming("0 30 2 * * *", 3, start, "Europe/Berlin") == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]
    hourly = upcoming(
        "0 30 * * * *", 3, datetime(2026, 3, 29, 0, 40, tzinfo=BERLIN), "Europe/Berlin"
    )
    assert hourly == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:30:00+02:00",  # 02:30 does not exist that night
        "2026-03-29T04:30:00+02:00",
    ]


def test_berlin_fall_back() -> None:
    """On 25 October 2026 02:00-03:00 happens twice in Berlin; each wall-clock 02:30 fires."""
    start = datetime(2026, 10, 24, 12, tzinfo=BERLIN)
    times = parse_expression("0 30 2 * * *", "Europe/Berlin").next_times(start, 3)
    assert [t.isoformat() for t in times] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-26T02:30:00+01:00",
    ]
    instants = [t.astimezone(UTC) for t in times]
    assert instants == sorted(instants) and len(set(instants)) == 3


def test_local_time_stays_put_across_dst_in_new_york() -> None:
    """09:00 in New York stays 09:00 local across the March change; its UTC time moves."""
    start = datetime(2026, 3, 7, 12, tzinfo=NEW_YORK)
    times = parse_expression("0 9 * * *", "America/New_York").next_times(start, 2)
    assert [t.isoformat() for t in times] == [
        "2026-03-08T09:00:00-04:00",
        "2026-03-09T09:00:00-04:00",
    ]
    before = parse_expression("0 9 * * *", "America/New_York").next_times(
        datetime(2026, 3, 6, 12, tzinfo=NEW_YORK), 1
    )
    assert before[0].astimezone(UTC).hour == 14 and times[0].astimezone(UTC).hour == 13


def test_latest_at_or_before_includes_the_slot_itself() -> None:
    """The latest slot at or before a time is that time when it is a slot, else the one before."""
    schedule = parse_expression("*/10 * * * * *")
    on_slot = datetime(2026, 1, 1, 0, 0, 20, tzinfo=UTC)
    assert schedule.latest_at_or_before(on_slot) == on_slot
    assert schedule.latest_at_or_before(on_slot.replace(second=29, microsecond=999_999)) == on_slot
    assert schedule.next_after(on_slot) == on_slot.replace(second=30)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 0 0 * * 8", "bad day of week field '8'"),
        ("60 * * * * *", "bad second field '60'"),
        ("61 * * * *", "bad minute field '61'"),
        ("0 0 24 * * *", "bad hour field '24'"),
        ("0 0 0 32 * *", "bad day of month field '32'"),
        ("0 0 0 * 13 *", "bad month field '13'"),
        ("0 0 0 * * * 1969", "bad year field '1969'"),
        ("*/0 * * * * *", "bad second field '*/0'"),
        ("a b c d e f", "bad second field 'a'"),
        ("* * *", "not 3"),
        ("* * * * * * * *", "not 8"),
        ("", "empty"),
        ("@reboot", "unknown shorthand"),
        ("H * * * *", "hashed"),
        ("R 0 * * * *", "random"),
        ("0 0 0 30 2 *", "never fires"),
        ("0 0 0 1 1 * 2020", "never fires"),
        ("0 0 0 * * *\u00a0", "printable"),
        ("* " * 200, "longer than 256"),
    ],
)
def test_invalid_expressions_are_101_with_the_reason(expression: str, reason: str) -> None:
    """Every invalid expression raises InvalidCronExpression (code 101) saying why."""
    with pytest.raises(InvalidCronExpression) as error:
        parse_expression(expression)
    assert error.value.code == 101
    assert reason in error.value.message


def test_expression_must_be_a_string() -> None:
    """A non-string expression is an invalid param naming the field."""
    with pytest.raises(InvalidParams, match="cron_expression"):
        parse_expression(42)


def test_expression_is_normalised() -> None:
    """Runs of whitespace between fields become one space; the schedule is unchanged."""
    schedule = parse_expression("  0\t30  9 * * 1-5 ")
    assert isinstance(schedule, CronSchedule)
    assert schedule.expression == "0 30 9 * * 1-5"


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_text_is_a_schedule_or_a_101(expression: str) -> None:
    """No input makes parsing fail with anything but InvalidCronExpression."""
    try:
        schedule = parse_expression(expression)
    except InvalidCronExpression:
        return
    assert schedule.next_after(START) is not None


@given(
    st.lists(
        st.sampled_from(["*", "0", "5", "1-5", "*/2", "0,30", "7", "L", "?", "mon", "jan"]),
        min_size=6,
        max_size=6,
    )
)
@settings(max_examples=300, deadline=None)
def test_valid_field_combinations_match_croniter(fields: list[str]) -> None:
    """Whatever parses gives exactly croniter's next times (croniter is the source of truth)."""
    expression = " ".join(fields)
    try:
        schedule = parse_expression(expression)
    except InvalidCronExpression:
        return
    times = [t.isoformat() for t in schedule.next_times(START, 3)]
    assert times == croniter_says(expression, len(times))


@pytest.mark.parametrize("name", ["probe", "db 5432 every 10s", "ünïcödé", "x" * 128])
def test_good_names(name: str) -> None:
    """Names up to 128 characters without slashes or control characters are accepted."""
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * 129, "128"),
        ("a/b", "'/'"),
        ("a\\b", "'/'"),
        ("tab\there", "control"),
        ("nul\x00", "control"),
        ("del\x7f", "control"),
    ],
)
def test_bad_names_are_108(name: str, reason: str) -> None:
    """Bad names raise InvalidInput (code 108) with the reason."""
    with pytest.raises(InvalidInput) as error:
        validate_name(name)
    assert error.value.code == 108 and reason in error.value.message


def test_name_must_be_a_string() -> None:
    """A non-string name is an invalid param."""
    with pytest.raises(InvalidParams, match="name"):
        validate_name(None)
