"""SQLModel tables: tasks, tokens, agents, crons and their fire history, cluster nodes, KV,
host monitoring reports, alert channels, rules, events and their deliveries.

The single source of column names, types and order: the store builds every statement
from these tables (``task_t`` and the others are their typed Core handles).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Dialect,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

JsonColumn = JSON().with_variant(JSONB(), "postgresql")


class JsonText(TypeDecorator[Any]):
    """Any JSON value, kept as TEXT: SQLite gives its JSON columns numeric affinity, so a
    bare number stored there (a KV value such as 12.5) would come back as a number, not JSON."""

    impl = Text
    cache_ok = True
    should_evaluate_none = True  # None is the JSON value null, not SQL NULL

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        return orjson.dumps(value).decode()

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else orjson.loads(value)


AnyJsonColumn = JsonText().with_variant(JSONB(none_as_null=False), "postgresql")
IdType = BigInteger().with_variant(Integer(), "sqlite")


def _id() -> Any:
    return Field(default=None, sa_column=Column(IdType, primary_key=True, autoincrement=True))


def _ms(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(BigInteger, nullable=nullable, index=index))


class TaskState(IntEnum):
    """Where a task is in its life; only QUEUED and RUNNING tasks have no result."""

    QUEUED = 0
    RUNNING = 1
    DONE = 2
    FAILED_BY_SERVER = 3


OPEN_TASK = text(f"state < {int(TaskState.DONE)}")
"""The rows of tasks without a result: the predicate of the partial indexes on open tasks."""
QUEUED_TASK = text(f"state = {int(TaskState.QUEUED)}")


class Task(SQLModel, table=True):
    """One task sent (or queued) to one agent, and its result."""

    __tablename__ = "task"
    __table_args__ = (
        Index("ix_task_uuid_type_order", "uuid", "type", "order_ts", "id"),
        Index("ix_task_uuid_order", "uuid", "order_ts", "id"),
        Index("ix_task_type_order", "type", "order_ts", "id"),
        Index("ix_task_order", "order_ts", "id"),
        Index("ix_task_cron_order", "cron_source", "order_ts", "id"),
        Index(
            "ix_task_open_deadline",
            "deadline",
            sqlite_where=OPEN_TASK,
            postgresql_where=OPEN_TASK,
        ),
        Index(
            "ix_task_open_order",
            "order_ts",
            "id",
            sqlite_where=OPEN_TASK,
            postgresql_where=OPEN_TASK,
        ),
        Index(
            "ix_task_queued_uuid",
            "uuid",
            sqlite_where=QUEUED_TASK,
            postgresql_where=QUEUED_TASK,
        ),
    )

    id: int | None = _id()
    uuid: str = Field(max_length=36)
    task_token: str = Field(max_length=16)
    type: str = Field(max_length=16)
    task_event_type: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    state: int = Field(default=TaskState.RUNNING)
    created_at: int = _ms()
    deadline: int = _ms()
    queue_ttl_ms: int | None = _ms(nullable=True)
    order_ts: int = _ms()
    timestamp: int | None = _ms(nullable=True)
    success: bool | None = None
    error_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    task_event_result: Any = Field(default=None, sa_column=Column(JsonColumn, nullable=True))
    cron_source: str | None = Field(default=None, max_length=128)
    created_by: str | None = Field(default=None, max_length=64)
    waiter_node: str | None = Field(default=None, max_length=64)


class Token(SQLModel, table=True):
    """An API token; secrets and passwords are stored only as hashes."""

    __tablename__ = "token"

    id: int | None = _id()
    key: str = Field(max_length=64, unique=True)
    secret_hash: str = Field(max_length=128)
    username: str | None = Field(default=None, max_length=128, unique=True)
    password_hash: str | None = Field(default=None, max_length=256)
    is_super: bool = False
    limits: Any = Field(default_factory=list, sa_column=Column(JsonColumn, nullable=False))
    timestamp_from: int | None = _ms(nullable=True)
    timestamp_to: int | None = _ms(nullable=True)
    max_uses: int | None = Field(default=None)
    uses: int = 0
    description: str | None = Field(default=None, max_length=256)
    created_at: int = _ms()
    updated_at: int = _ms()


class Agent(SQLModel, table=True):
    """Every agent UUID ever seen, and where it is connected now.

    ``deleted_at`` marks a soft delete: the agent is left out of the lists (its
    history stays) until it calls in after that time.
    """

    __tablename__ = "agent"

    uuid: str = Field(primary_key=True, max_length=36)
    first_seen: int = _ms()
    last_seen: int = _ms()
    connected_since: int | None = _ms(nullable=True)
    remote_addr: str | None = Field(default=None, max_length=128)
    node_id: str | None = Field(default=None, max_length=64)
    token_key: str | None = Field(default=None, max_length=64)
    deleted_at: int | None = _ms(nullable=True)


class Kv(SQLModel, table=True):
    """One key of a KV namespace; a namespace exists while it has a key (see methods/kv.py)."""

    __tablename__ = "kv"
    __table_args__ = (UniqueConstraint("namespace", "key", name="uq_kv_namespace_key"),)

    id: int | None = _id()
    namespace: str = Field(max_length=128)
    key: str = Field(max_length=512)
    value: Any = Field(default=None, sa_column=Column(AnyJsonColumn, nullable=False))


class Cron(SQLModel, table=True):
    """A recurring task definition."""

    __tablename__ = "cron"

    id: int | None = _id()
    name: str = Field(max_length=128, unique=True)
    enable: bool = True
    cron_expression: str = Field(max_length=256)
    cron_type: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    task_type: str = Field(max_length=16)
    queue_ttl_ms: int | None = _ms(nullable=True)
    result_retention_ms: int | None = _ms(nullable=True)
    """How long this cron's result rows are kept; None: the server's default."""
    last_run_time: int | None = _ms(nullable=True)
    created_by: str | None = Field(default=None, max_length=64)
    created_at: int = _ms()
    updated_at: int = _ms()


class CronResult(SQLModel, table=True):
    """One target of one fire of a cron."""

    __tablename__ = "cron_result"
    __table_args__ = (
        Index("ix_cron_result_cron_run", "cron_id", "run_time", "id"),
        Index("ix_cron_result_name_run", "cron_name", "run_time", "id"),
        Index("ix_cron_result_run", "run_time", "id"),
    )

    id: int | None = _id()
    cron_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    cron_name: str = Field(max_length=128)
    run_time: int = _ms()
    agent_uuid: str | None = Field(default=None, max_length=36)
    relative_id: int | None = _ms(nullable=True)
    success: bool = False
    message: str = Field(default="", sa_column=Column(Text, nullable=False))


class CronFire(SQLModel, table=True):
    """One row per (cron, slot) fired: the guard that no slot fires twice."""

    __tablename__ = "cron_fire"
    __table_args__ = (
        UniqueConstraint("cron_id", "slot", name="uq_cron_fire_slot"),
        Index(
            "ix_cron_fire_pending",
            "id",
            sqlite_where=text("pending IS NOT NULL"),
            postgresql_where=text("pending IS NOT NULL"),
        ),
    )

    id: int | None = _id()
    cron_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    slot: int = _ms()
    fired_at: int = _ms()
    node_id: str | None = Field(default=None, max_length=64)
    # until its result rows are stored: {"cron_name", "cron_type"} as the fire saw them
    # (None is SQL NULL here, never a JSON null, so "IS NOT NULL" means pending)
    pending: Any = Field(
        default=None,
        sa_column=Column(
            JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"),
            nullable=True,
        ),
    )


class Node(SQLModel, table=True):
    """A server process of a cluster, with its heartbeat."""

    __tablename__ = "node"

    id: str = Field(primary_key=True, max_length=64)
    address: str = Field(default="", max_length=256)
    started_at: int = _ms()
    heartbeat: int = _ms()


class StaticMonitoring(SQLModel, table=True):
    """A host's static report (CPU, system, GPUs); a new row only when its data hash changes."""

    __tablename__ = "static_monitoring"
    __table_args__ = (Index("ix_static_monitoring_uuid_time", "uuid", "time"),)

    id: int | None = _id()
    uuid: str = Field(max_length=36)
    time: int = _ms()
    storage_time: int = _ms()
    data_hash: str = Field(max_length=64)
    cpu: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    system: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    gpu: Any = Field(sa_column=Column(JsonColumn, nullable=False))


def _key_uuid() -> Any:
    return Field(default=None, sa_column=Column(String(36), primary_key=True))


def _key_time() -> Any:
    return Field(default=None, sa_column=Column(BigInteger, primary_key=True, autoincrement=False))


class DynamicMonitoring(SQLModel, table=True):
    """A host's dynamic report, kept as sent (cpu, ram, load, system, disk, network, gpu)."""

    __tablename__ = "dynamic_monitoring"

    uuid: str = _key_uuid()
    time: int = _key_time()
    storage_time: int = _ms()
    data: Any = Field(sa_column=Column(JsonColumn, nullable=False))


def _small() -> Any:
    return Field(default=None, sa_column=Column(SmallInteger, nullable=True))


def _int() -> Any:
    return Field(default=None, sa_column=Column(Integer, nullable=True))


def _big() -> Any:
    return Field(default=None, sa_column=Column(BigInteger, nullable=True))


class DynamicMonitoringSummary(SQLModel, table=True):
    """A host's flat summary, one typed column per figure (what charts read).

    ``cpu_usage`` and the loads are stored times ten, as sent (NodeGet's format).
    """

    __tablename__ = "dynamic_monitoring_summary"

    uuid: str = _key_uuid()
    time: int = _key_time()
    storage_time: int = _ms()
    cpu_usage: int | None = _small()
    gpu_usage: int | None = _small()
    used_swap: int | None = _big()
    total_swap: int | None = _big()
    used_memory: int | None = _big()
    total_memory: int | None = _big()
    available_memory: int | None = _big()
    load_one: int | None = _small()
    load_five: int | None = _small()
    load_fifteen: int | None = _small()
    uptime: int | None = _int()
    boot_time: int | None = _big()
    process_count: int | None = _int()
    total_space: int | None = _big()
    available_space: int | None = _big()
    read_speed: int | None = _big()
    write_speed: int | None = _big()
    tcp_connections: int | None = _int()
    udp_connections: int | None = _int()
    total_received: int | None = _big()
    total_transmitted: int | None = _big()
    transmit_speed: int | None = _big()
    receive_speed: int | None = _big()


ROLLUP_FIGURES: tuple[str, ...] = tuple(
    name
    for name in DynamicMonitoringSummary.model_fields
    if name not in ("uuid", "time", "storage_time")
)
"""The summary figures a rollup keeps count, sum, min and max of."""
ROLLUP_PARTS = ("count", "sum", "min", "max")
TENTHS = frozenset({"cpu_usage", "load_one", "load_five", "load_fifteen"})
"""The summary figures stored in tenths (a CPU of 12.3 % is stored as 123)."""


def summary_point(row: Mapping[str, Any], figures: Iterable[str]) -> dict[str, Any]:
    """A stored summary row as queries answer it: ``uuid``, ``timestamp`` and ``figures``
    (those stored in tenths as values)."""
    point = {"uuid": row["uuid"], "timestamp": row["time"]}
    for name in figures:
        value = row[name]
        point[name] = value / 10 if value is not None and name in TENTHS else value
    return point


summary_rollup_t = Table(
    "dynamic_monitoring_summary_rollup",
    SQLModel.metadata,
    Column("uuid", String(36), primary_key=True),
    Column("resolution", Integer, primary_key=True, autoincrement=False),
    Column("bucket", BigInteger, primary_key=True, autoincrement=False),
    *(
        Column(
            f"{name}_{part}",
            {"count": Integer, "sum": Float, "min": BigInteger, "max": BigInteger}[part],
            nullable=part != "count",
            default=None,
        )
        for name in ROLLUP_FIGURES
        for part in ROLLUP_PARTS
    ),
)
"""Summaries rolled up per agent into buckets of ``resolution`` ms starting at ``bucket``
(ms): per figure how many reports had it, their sum, min and max (written as each
summary is stored; see store/monitoring.py)."""


class AlertChannel(SQLModel, table=True):
    """Where alert notifications go: an Apprise URL (secrets inside it are never returned)."""

    __tablename__ = "alert_channel"

    id: int | None = _id()
    name: str = Field(max_length=128, unique=True)
    url: str = Field(sa_column=Column(Text, nullable=False))
    created_at: int = _ms()
    updated_at: int = _ms()


class AlertRule(SQLModel, table=True):
    """A condition watched on agents (see alerts/rules.py for the kinds and their params)."""

    __tablename__ = "alert_rule"

    id: int | None = _id()
    name: str = Field(max_length=128, unique=True)
    kind: str = Field(max_length=32)
    targets: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    params: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    channels: Any = Field(sa_column=Column(JsonColumn, nullable=False))
    enable: bool = True
    remind_ms: int | None = _ms(nullable=True)
    created_at: int = _ms()
    updated_at: int = _ms()


class AlertEvent(SQLModel, table=True):
    """One episode of a rule's condition on one agent: firing until it resolves.

    ``open_key`` (``rule_id:uuid``) is set while the event fires: unique, so one
    condition never has two firing events, whichever node tries to start one.
    """

    __tablename__ = "alert_event"
    __table_args__ = (
        Index("ix_alert_event_started", "started_at", "id"),
        Index("ix_alert_event_rule_started", "rule", "started_at"),
        Index("ix_alert_event_uuid_started", "uuid", "started_at"),
    )

    id: int | None = _id()
    rule_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    rule: str = Field(max_length=128)
    uuid: str = Field(max_length=36)
    state: str = Field(max_length=16)
    started_at: int = _ms()
    resolved_at: int | None = _ms(nullable=True)
    reminded_at: int | None = _ms(nullable=True)
    message: str = Field(sa_column=Column(Text, nullable=False))
    open_key: str | None = Field(default=None, max_length=200, unique=True)


class AlertDelivery(SQLModel, table=True):
    """The outbox: one notification of one event to one channel, written with the event change.

    ``state`` 0 waits (from ``next_at`` on), 1 was sent, 2 was given up after its retries.
    A sender claims a row until ``claimed_until`` so that no two send it at once.
    """

    __tablename__ = "alert_delivery"
    __table_args__ = (
        Index("ix_alert_delivery_due", "state", "next_at"),
        Index("ix_alert_delivery_event", "event_id"),
    )

    id: int | None = _id()
    event_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    channel: str = Field(max_length=128)
    kind: str = Field(max_length=16)
    created_at: int = _ms()
    next_at: int = _ms()
    state: int = 0
    attempts: int = 0
    sent_at: int | None = _ms(nullable=True)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: int | None = _ms(nullable=True)


def _table(model: type[SQLModel]) -> Table:
    """The Core table of a model (SQLModel leaves ``__table__`` untyped)."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


task_t = _table(Task)
token_t = _table(Token)
agent_t = _table(Agent)
kv_t = _table(Kv)
cron_t = _table(Cron)
cron_result_t = _table(CronResult)
cron_fire_t = _table(CronFire)
node_t = _table(Node)
static_monitoring_t = _table(StaticMonitoring)
dynamic_monitoring_t = _table(DynamicMonitoring)
summary_t = _table(DynamicMonitoringSummary)
summary_latest_t = Table(
    "dynamic_monitoring_summary_latest",
    SQLModel.metadata,
    *(
        Column(c.name, c.type, primary_key=c.name == "uuid", nullable=c.nullable)
        for c in summary_t.c
    ),
    Column("point", Text, nullable=True),
)
"""Each agent's newest summary (a copy of its row in ``summary_t``), kept on write so that the
newest summaries of a whole fleet are one small table's rows (see store/monitoring.py), and
``point``: the JSON of that summary with every figure as a multi-last query answers it (made
when it is written; NULL where the row was rebuilt by a delete or a prune)."""
alert_channel_t = _table(AlertChannel)
alert_rule_t = _table(AlertRule)
alert_event_t = _table(AlertEvent)
alert_delivery_t = _table(AlertDelivery)
