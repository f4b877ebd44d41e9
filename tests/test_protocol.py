"""Wire types: the spec's examples round-trip exactly; bad input names its field."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import fields
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskd.errors import InvalidInput, InvalidParams
from taskd.protocol import (
    CRON_TYPE,
    RESULT_VARIANTS,
    TASK_TYPES,
    TASK_VARIANTS,
    TaskEventResponse,
    TaskPush,
    TaskRecord,
    TaskResponse,
    limits_to_wire,
    parse_cron_result_query,
    parse_limits,
    parse_task_conditions,
    parse_task_event_result,
    parse_task_event_type,
    parse_task_query,
    split_host_port,
)

TERMINAL = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"
TASK_EXAMPLES: list[Any] = [
    {"ping": "host"},
    {"ping": "127.0.0.1"},
    {"tcp_ping": "host:80"},
    {"tcp_ping": "[::1]:5432"},
    {"http_ping": "https://host/path"},
    {"http_request": {"url": "https://host/x", "method": "GET", "headers": {}}},
    {
        "http_request": {
            "url": "http://127.0.0.1:8080/post",
            "method": "POST",
            "headers": {"content-type": "text/plain"},
            "body": "hello",
            "ip": "ipv4 auto",
        }
    },
    {
        "http_request": {
            "url": "http://h/",
            "method": "PUT",
            "headers": {},
            "body_base64": "AAEC",
            "ip": "::1",
        }
    },
    {
        "dns": {
            "domain": "example.com",
            "record_types": ["a", "aaaa", "cname", "mx", "txt", "ns", "srv", "soa", "caa"],
        }
    },
    {"dns": {"domain": "1.2.3.4", "record_types": ["ptr"], "dns_server": "127.0.0.1:53"}},
    {"web_shell": {"url": "wss://host/auto_gen", "terminal_id": TERMINAL}},
    {"execute": {"cmd": "ls", "args": ["-l"]}},
    "read_config",
    {"edit_config": 'agent_uuid = "auto_gen"\n'},
    "ip",
    "version",
    {"self_update": "v1.2.3"},
]
RESULT_EXAMPLES: list[Any] = [
    {"ping": 12.5},
    {"tcp_ping": 0.8},
    {"http_ping": 41.0},
    {"http_request": {"status": 200, "headers": [{"k": "v"}, {"k": "w"}], "body": "..."}},
    {"http_request": {"status": 204, "headers": [], "body_base64": "//4="}},
    {"dns": [{"record_type": "a", "time": 15.5, "data": "1.2.3.4"}]},
    {"web_shell": True},
    {"execute": "output"},
    {"read_config": "<toml>"},
    {"edit_config": True},
    {"ip": ["1.2.3.4", None]},
    {"ip": [None, "2001:db8::1"]},
    {"version": {"taskd": "0.1.0"}},
    {"self_update": False},
]


@pytest.mark.parametrize("example", TASK_EXAMPLES, ids=repr)
def test_task_types_round_trip_exactly(example: Any) -> None:
    """Each TaskEventType example parses and serialises back to identical JSON."""
    assert parse_task_event_type(example).to_wire() == example


@pytest.mark.parametrize("example", RESULT_EXAMPLES, ids=repr)
def test_results_round_trip_exactly(example: Any) -> None:
    """Each TaskEventResult example parses and serialises back to identical JSON."""
    assert parse_task_event_result(example).to_wire() == example


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"ping": 1}, "task_event_type.ping: Input should be a valid string"),
        ({"ping": "has space"}, "task_event_type.ping"),
        ({"tcp_ping": "host"}, "must be host:port"),
        ({"tcp_ping": "host:0"}, "no valid port"),
        ({"tcp_ping": "::1:80"}, "[addr]:port"),
        ({"http_ping": "ftp://h/"}, "absolute http/https URL"),
        ({"http_request": {"url": "http://h/"}}, "http_request.method: Field required"),
        (
            {
                "http_request": {
                    "url": "http://h/",
                    "method": "GET",
                    "headers": {},
                    "body": "a",
                    "body_base64": "YQ==",
                }
            },
            "mutually exclusive",
        ),
        (
            {"http_request": {"url": "http://h/", "method": "G T", "headers": {}}},
            "not a valid HTTP method",
        ),
        (
            {"http_request": {"url": "http://h/", "method": "GET", "headers": {"a": "b\r\nc"}}},
            "CR, LF",
        ),
        (
            {"http_request": {"url": "http://h/", "method": "GET", "headers": {}, "ip": "eth0"}},
            "ipv4 auto",
        ),
        ({"dns": {"domain": "x", "record_types": []}}, "record_types"),
        ({"dns": {"domain": "x", "record_types": ["mxx"]}}, "record_types.0"),
        ({"dns": {"domain": "example.com", "record_types": ["ptr"]}}, "ptr lookup takes an IP"),
        ({"dns": {"domain": "x", "record_types": ["a"], "dns_server": "dns.google:53"}}, "ip:port"),
        ({"web_shell": {"url": "http://h/", "terminal_id": TERMINAL}}, "ws/wss"),
        ({"web_shell": {"url": "ws://h/", "terminal_id": "nope"}}, "not a valid UUID"),
        ({"execute": {"cmd": "", "args": 1}}, "execute.args"),
        ({"execute": {"cmd": "ls"}}, "execute.args: Field required"),
        ({"execute": {"cmd": "ls", "args": "-l"}}, "execute.args"),
        ({"execute": {"cmd": "ls", "args": [], "shell": True}}, "Extra inputs"),
        ({"self_update": "1.2.3"}, "vX.Y.Z"),
        ("read_config_", "unknown task type"),
        ({"ip": 1}, "expected the string 'ip' or {'ip': null}"),
        ({"version": {}}, "task_event_type.version"),
        ({"read_config": None, "ip": None}, "one key"),
        ({"a": 1, "b": 2}, "one key"),
        (None, "one key"),
    ],
)
def test_invalid_task_types_name_the_field(value: Any, fragment: str) -> None:
    """Invalid task types raise -32602 with a message that says what and where."""
    with pytest.raises(InvalidParams) as error:
        parse_task_event_type(value)
    assert error.value.code == -32602
    assert error.value.message.startswith("task_event_type")
    assert fragment in error.value.message


@pytest.mark.parametrize("name", ["read_config", "ip", "version"])
def test_unit_task_types_accept_the_object_form(name: str) -> None:
    """A unit task type sent as {"<name>": null} (serde's other form) parses and is written bare."""
    assert parse_task_event_type({name: None}).to_wire() == name


@pytest.mark.parametrize("cmd", ["", "   ", "\t\n"])
def test_blank_execute_cmd_is_invalid_input(cmd: str) -> None:
    """An empty or blank execute cmd is well-formed but unacceptable: 108, naming the field."""
    with pytest.raises(InvalidInput) as error:
        parse_task_event_type({"execute": {"cmd": cmd, "args": []}}, "task_type")
    assert error.value.code == 108
    assert error.value.wire_message == (
        "Invalid input: task_type.execute.cmd: must not be empty or blank"
    )


def test_edit_config_needs_a_toml_document_of_any_agent() -> None:
    """edit_config takes any agent's TOML (NodeGet's keys too) and refuses broken TOML with 108."""
    nodeget = 'agent_uuid = "x"\nallow_icmp_ping = true\ndynamic_report_interval_ms = 1000\n'
    task = parse_task_event_type({"edit_config": nodeget}, "task_type")
    assert task.to_wire() == {"edit_config": nodeget}
    with pytest.raises(InvalidInput) as error:
        parse_task_event_type({"edit_config": "allow_task = [unclosed"}, "task_type")
    assert error.value.wire_message.startswith(
        "Invalid input: task_type.edit_config: not a TOML document: "
    )


def test_ping_like_results_have_their_own_variants() -> None:
    """tcp_ping and http_ping answer with their own variant; each refuses a negative time."""
    assert type(parse_task_event_result({"tcp_ping": 0.8})).kind == "tcp_ping"
    assert type(parse_task_event_result({"http_ping": 41.0})).kind == "http_ping"
    for bad in ({"tcp_ping": -1.0}, {"http_ping": "41"}, {"tcp_ping": float("nan")}):
        with pytest.raises(InvalidParams):
            parse_task_event_result(bad)


def test_results_reject_wrong_shapes() -> None:
    """Results with wrong field types or bad addresses are refused."""
    for bad in (
        {"ping": "12"},
        {"ping": -1.0},
        {"ip": ["1.2.3.4"]},
        {"ip": ["::1", None]},
        {"http_request": {"status": 200, "headers": [{"a": "1", "b": "2"}]}},
        {"dns": [{"record_type": "a", "time": 1.0}]},
        {"nope": 1},
    ):
        with pytest.raises(InvalidParams):
            parse_task_event_result(bad)


def test_task_response_canonicalises_the_agent_uuid() -> None:
    """An upload's agent_uuid is checked as a UUID and compared in canonical form."""
    response = TaskResponse.model_validate(
        {
            "task_id": 1,
            "agent_uuid": TERMINAL.upper(),
            "task_token": "x",
            "timestamp": 1,
            "success": True,
        }
    )
    assert response.agent_uuid == TERMINAL


def test_query_conditions_combine() -> None:
    """All twelve condition forms parse; last wins over limit; bounds intersect."""
    query = parse_task_query(
        {
            "condition": [
                {"task_id": 4},
                {"uuid": TERMINAL},
                {"timestamp_from_to": [10, 50]},
                {"timestamp_from": 20},
                {"timestamp_to": 40},
                "is_success",
                "is_failure",
                "is_running",
                {"type": "ping"},
                {"cron_source": "c"},
                {"limit": 5},
                "last",
            ]
        }
    )
    assert query.task_ids == (4,) and query.uuids == (TERMINAL,)
    assert (query.timestamp_from, query.timestamp_to) == (20, 40)
    assert query.is_success and query.is_failure and query.is_running
    assert query.types == ("ping",) and query.cron_sources == ("c",)
    assert query.limit == 1 and query.condition_count == 12
    assert parse_task_conditions([{"limit": 7}, {"limit": 3}]).limit == 3
    assert parse_task_conditions([]).limit is None


def test_unit_conditions_accept_the_object_form() -> None:
    """{"last": null} and the other unit conditions mean what their bare strings mean."""
    objects = parse_task_conditions(
        [
            {"is_success": None},
            {"is_failure": None},
            {"is_running": None},
            {"limit": 5},
            {"last": None},
        ]
    )
    strings = parse_task_conditions(
        ["is_success", "is_failure", "is_running", {"limit": 5}, "last"]
    )
    assert objects == strings
    assert objects.limit == 1 and objects.is_success and objects.is_running
    query = parse_cron_result_query({"condition": [{"is_failure": None}, {"last": None}]})
    assert query.is_failure and not query.is_success and query.limit == 1
    assert parse_cron_result_query({"condition": [{"is_success": None}]}).is_success


@pytest.mark.parametrize(
    "bad",
    [
        {"condition": [{"type": "pingx"}]},
        {"condition": ["sometimes"]},
        {"condition": [{"limit": -1}]},
        {"condition": [{"limit": True}]},
        {"condition": [{"timestamp_from_to": [1]}]},
        {"condition": [{"uuid": "x"}]},
        {"condition": [{"last": 1}]},
        {"condition": [{"is_running": False}]},
        {"condition": [{"last": None, "limit": 1}]},
        {"condition": "last"},
        {"conditions": []},
        [],
    ],
)
def test_bad_query_conditions_are_refused(bad: Any) -> None:
    """Malformed conditions are -32602 errors naming the condition."""
    with pytest.raises(InvalidParams) as error:
        parse_task_query(bad)
    assert "task_data_query" in error.value.message


def test_cron_types_and_result_conditions() -> None:
    """Agent cron types round-trip; crontab-result conditions parse."""
    cron = {"agent": [[TERMINAL], {"task": {"tcp_ping": "db:5432"}}]}
    assert CRON_TYPE.validate_python(cron).to_wire() == cron
    query = parse_cron_result_query(
        {"condition": [{"cron_name": "x"}, {"run_time_from_to": [1, 2]}, "is_failure", "last"]}
    )
    assert query.cron_names == ("x",) and query.limit == 1 and query.is_failure


def test_limits_round_trip() -> None:
    """Token limits parse every scope and permission form and serialise back."""
    limits = [
        {
            "scopes": ["global", {"global": None}, {"agent_uuid": TERMINAL}],
            "permissions": [
                {"task": "listen"},
                {"task": {"create": "tcp*"}},
                {"task": {"read": "*"}},
                {"crontab": "write"},
                {"crontab_result": {"delete": "nightly-*"}},
                {"terminal": "connect"},
            ],
        }
    ]
    assert limits_to_wire(parse_limits(limits)) == limits
    with pytest.raises(InvalidParams):
        parse_limits(
            [{"scopes": ["global"], "permissions": [{"task": {"create": "a", "read": "b"}}]}]
        )


def test_split_host_port() -> None:
    """host:port and [v6]:port split; names and v4 literals keep their form."""
    assert split_host_port("db.internal:5432") == ("db.internal", 5432)
    assert split_host_port("[::1]:80") == ("::1", 80)
    assert split_host_port("10.0.0.1:65535") == ("10.0.0.1", 65535)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=10,
    )
)
def test_arbitrary_json_never_escapes_as_another_error(value: Any) -> None:
    """Any JSON value either parses as a task type or raises InvalidParams, nothing else."""
    with contextlib.suppress(InvalidParams):
        parse_task_event_type(value)


def test_each_task_kind_is_declared_once_by_its_variant() -> None:
    """The kind list, the results and the ``type`` query condition all follow the variants."""
    assert len(set(TASK_TYPES)) == len(TASK_TYPES) == len(TASK_VARIANTS)
    assert {parse_task_event_type(example).kind for example in TASK_EXAMPLES} == set(TASK_TYPES)
    assert [variant.kind for variant in RESULT_VARIANTS] == list(TASK_TYPES)
    for kind in TASK_TYPES:
        assert parse_task_query({"condition": [{"type": kind}]}).types == (kind,)
    with pytest.raises(InvalidParams, match=r"condition\.0\.type"):
        parse_task_query({"condition": [{"type": "pingg"}]})


def test_replies_serialise_themselves_in_wire_order() -> None:
    """TaskPush, TaskRecord and TaskEventResponse dump to the exact wire JSON, fields in order."""
    push = orjson.loads(TaskPush(7, "tok", {"ping": "host"}).serialize(42))
    assert push == {
        "jsonrpc": "2.0",
        "method": "task_register_task",
        "params": {
            "subscription": 42,
            "result": {"task_id": 7, "task_token": "tok", "task_event_type": {"ping": "host"}},
        },
    }
    agent = str(uuid.uuid4())
    record = TaskRecord(1, agent, None, None, None, "ip", None, None)
    assert list(orjson.loads(orjson.dumps(record))) == [f.name for f in fields(TaskRecord)]
    response = TaskEventResponse(1, agent, "tok", 5, True, None, {"ping": 1.5})
    assert orjson.dumps(response) == orjson.dumps(
        {
            "task_id": 1,
            "agent_uuid": agent,
            "task_token": "tok",
            "timestamp": 5,
            "success": True,
            "error_message": None,
            "task_event_result": {"ping": 1.5},
        }
    )
