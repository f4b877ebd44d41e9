"""Typed settings for the server and the agent, loaded from TOML.

Only the ``taskd.cli`` package reads the environment; it passes ``TASKD_*`` values in as
overrides, so this module stays a pure function of its inputs.
"""

from __future__ import annotations

import os
import tomllib
import uuid
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomlkit

from taskd.errors import ConfigNotFound, InvalidInput
from taskd.protocol import TASK_TYPES, canonical_uuid

DEFAULT_PORT = 2211
MiB = 1 << 20


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise InvalidInput(f"{name}: expected a boolean, got {value!r}")


def _int(value: Any, name: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidInput(f"{name}: {number} is outside {low}..{high}")
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: expected a string, got {value!r}")
    return value


def _str_list(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{name}: expected a list of strings")
    return tuple(value)


def normalize_database_url(url: str, base: Path) -> str:
    """Pick the async driver for a URL and resolve a relative SQLite path against ``base``."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            url = driver + url[len(plain) :]
    prefix = "sqlite+aiosqlite:///"
    if url.startswith(prefix):
        path = url[len(prefix) :]
        if path and path != ":memory:" and not path.startswith("/"):
            url = prefix + str((base / path).resolve())
    return url


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``taskd serve`` needs; see config.example.toml for each key."""

    server_uuid: str
    database_url: str
    config_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    timezone: str = "UTC"
    max_message_bytes: int = 10 * MiB
    task_deadline_ms: int = 600_000
    reaper_interval_ms: int = 1_000
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 20.0
    log_level: str = "info"
    allowed_origins: tuple[str, ...] = ()
    auth_burst: int = 20
    auth_rate_per_s: float = 2.0
    node_id: str = ""
    node_address: str = ""
    node_grace_ms: int = 10_000
    db_pool_size: int = 10
    max_batch_items: int = 10_000
    trust_forwarded_for: tuple[str, ...] = ()
    monitoring_dynamic_retention_s: int = 1800
    monitoring_summary_retention_s: int = 4 * 3600
    monitoring_rollup_1m_retention_s: int = 2 * 86400
    monitoring_rollup_1h_retention_s: int = 400 * 86400
    monitoring_static_retention_s: int = 400 * 86400
    monitoring_prune_interval_s: int = 60
    monitoring_point_cache_bytes: int = 64 * MiB
    task_retention_s: int = 30 * 86400
    task_retention_by_type: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    cron_result_retention_s: int = 30 * 86400
    alert_sweep_ms: int = 500
    alert_probe_interval_ms: int = 1_000
    alert_metric_interval_ms: int = 5_000
    alert_batch_window_ms: int = 1_000
    alert_retry_base_ms: int = 2_000
    alert_retry_max_ms: int = 300_000
    alert_retry_max: int = 8
    alert_send_timeout_ms: int = 30_000
    admission_max_in_progress: int = 128
    admission_rate_per_s: int = 800
    admission_max_lag_ms: int = 30
    admission_lane_size: int = 2
    admission_retry_after_min_s: int = 1
    admission_retry_after_max_s: int = 30

    def task_retention_ms(self, task_type: str) -> int:
        """How long a finished task of ``task_type`` is kept, in ms."""
        return self.task_retention_by_type.get(task_type, self.task_retention_s) * 1000

    @property
    def is_sqlite(self) -> bool:
        """Whether the store is the embedded SQLite database."""
        return self.database_url.startswith("sqlite")


SERVER_KEYS = frozenset({f.name for f in fields(ServerSettings)} - {"config_path"} | {"listen"})
"""The keys of the ``[server]`` table (and of the TASKD_* variables that override them)."""


def _server_value(name: str, value: Any) -> Any:
    if name in ("port",):
        return _int(value, name, 1, 65535)
    if name == "monitoring_point_cache_bytes":
        return _int(value, name, 0)
    if name in (
        "max_message_bytes",
        "task_deadline_ms",
        "reaper_interval_ms",
        "auth_burst",
        "node_grace_ms",
        "db_pool_size",
        "max_batch_items",
        "task_retention_s",
        "cron_result_retention_s",
    ) or name.startswith(("monitoring_", "alert_")):
        return _int(value, name, 1)
    if name in ("admission_max_in_progress", "admission_max_lag_ms", "admission_rate_per_s"):
        return _int(value, name, 0)
    if name == "admission_lane_size":
        return _int(value, name, 1)
    if name in ("admission_retry_after_min_s", "admission_retry_after_max_s"):
        return _int(value, name, 1, 3600)
    if name == "task_retention_by_type":
        return _retention_by_type(value, name)
    if name in ("ws_ping_interval_s", "ws_ping_timeout_s", "auth_rate_per_s"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{name}: expected a number, got {value!r}") from None
    if name in ("allowed_origins", "trust_forwarded_for"):
        return _str_list(value, name)
    return _str(value, name)


def _retention_by_type(value: Any, name: str) -> Mapping[str, int]:
    """``{ping = 86400, ...}`` (a TOML table) or ``ping=86400,...`` (an environment value)."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for part in (p.strip() for p in value.split(",")):
            if part:
                key, sep, seconds = part.partition("=")
                if not sep:
                    raise InvalidInput(f"{name}: expected type=seconds pairs, got {part!r}")
                pairs[key.strip()] = seconds.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{name}: expected a table of task type = seconds, got {value!r}")
    unknown = set(value) - set(TASK_TYPES)
    if unknown:
        raise InvalidInput(
            f"{name}: unknown task type(s) {', '.join(sorted(map(str, unknown)))} "
            f"(known: {', '.join(TASK_TYPES)})"
        )
    return MappingProxyType({k: _int(v, f"{name}.{k}", 1) for k, v in value.items()})


def load_server_settings(
    path: Path | None, overrides: Mapping[str, Any] | None = None
) -> ServerSettings:
    """Read the ``[server]`` table of ``path`` and apply ``overrides`` (CLI flags, TASKD_* vars)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        if not path.exists():
            raise ConfigNotFound(
                f"No config file at {path}; run `taskd init --config {path}` first"
            )
        base = path.parent
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{path}: {exc}") from None
        raw = dict(document.get("server", {}))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(raw) - SERVER_KEYS
    if unknown:
        raise InvalidInput(f"unknown server setting(s): {', '.join(sorted(unknown))}")
    if "listen" in raw:
        host, _, port = _str(raw.pop("listen"), "listen").rpartition(":")
        raw.setdefault("host", host.strip("[]") or "127.0.0.1")
        raw.setdefault("port", port)
    values = {name: _server_value(name, value) for name, value in raw.items()}
    if "server_uuid" not in values:
        raise ConfigNotFound("server_uuid is not set; run `taskd init` first")
    try:
        values["server_uuid"] = canonical_uuid(values["server_uuid"])
        zoneinfo.ZoneInfo(values.get("timezone", "UTC"))
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise InvalidInput(f"server settings: {exc}") from None
    values["database_url"] = normalize_database_url(
        values.get("database_url", "sqlite:///taskd.db"), base
    )
    settings = ServerSettings(config_path=path, **values)
    if settings.admission_retry_after_min_s > settings.admission_retry_after_max_s:
        raise InvalidInput(
            "admission_retry_after_min_s: must not exceed admission_retry_after_max_s "
            f"({settings.admission_retry_after_min_s} > {settings.admission_retry_after_max_s})"
        )
    return settings


def write_default_server_config(path: Path) -> str:
    """Create a server config file at ``path`` with a fresh server UUID; return that UUID."""
    server_uuid = str(uuid.uuid4())
    document = tomlkit.document()
    document.add(tomlkit.comment("taskd server configuration (see config.example.toml)"))
    table = tomlkit.table()
    table["server_uuid"] = server_uuid
    table["listen"] = f"127.0.0.1:{DEFAULT_PORT}"
    table["database_url"] = "sqlite:///taskd.db"
    table["timezone"] = "UTC"
    document["server"] = table
    write_private_file(path, tomlkit.dumps(document))
    return server_uuid


def ensure_node_id(settings: ServerSettings) -> ServerSettings:
    """Give the node a persistent id: generated once and written into its config file."""
    if settings.node_id or settings.config_path is None:
        return settings
    node_id = str(uuid.uuid4())
    document = tomlkit.parse(settings.config_path.read_text())
    table = document.setdefault("server", tomlkit.table())
    table["node_id"] = node_id
    write_private_file(settings.config_path, tomlkit.dumps(document))
    return replace(settings, node_id=node_id)


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- agent


SAFE_TASK_TYPES = frozenset({"ping", "tcp_ping", "http_ping", "dns", "ip", "version"})
"""Task kinds an agent runs unless its configuration says otherwise."""


@dataclass(frozen=True)
class AgentServer:
    """One ``[[server]]`` table of an agent config: where to connect and what to allow."""

    name: str
    ws_url: str
    token: str
    server_uuid: str | None = None
    allow_task: bool = True
    allow_task_type: tuple[str, ...] = ()
    allow: Mapping[str, bool] = field(default_factory=dict)
    ignore_cert: bool = False

    def allows(self, task_type: str) -> bool:
        """Whether this server may run ``task_type`` on the agent."""
        if not self.allow_task:
            return False
        if self.allow_task_type:
            return task_type in self.allow_task_type
        return self.allow.get(task_type, task_type in SAFE_TASK_TYPES)


@dataclass(frozen=True)
class AgentSettings:
    """An agent's configuration (keys follow NodeGet's agent config)."""

    agent_uuid: str
    servers: tuple[AgentServer, ...]
    config_path: Path | None = None
    exec_max_character: int = 10_000
    exec_timeout_ms: int = 60_000
    terminal_shell: str = "/bin/sh"
    terminal_max_session_ms: int = 24 * 3600 * 1000
    connect_timeout_ms: int = 10_000
    ping_interval_ms: int = 20_000
    ping_timeout_ms: int = 20_000
    log_level: str = "info"
    max_concurrency: int = 10
    max_terminals: int = 8
    ip_echo_urls: tuple[str, ...] = ("https://api.ipify.org", "https://api6.ipify.org")
    self_update_index_url: str = ""
    self_update_find_links: str = ""
    report_metrics: bool = True
    static_report_interval_ms: int = 300_000
    dynamic_report_interval_ms: int = 1_000
    dynamic_summary_report_interval_ms: int = 1_000
    dynamic_summary_select_disk: tuple[str, ...] = ()
    dynamic_summary_select_network_interface: tuple[str, ...] = ()
    report_buffer_max_count: int = 3_600
    report_buffer_max_age_ms: int = 3_600_000
    report_backlog_per_second: int = 20
    report_backlog_jitter_ms: int = 10_000
    http_fallback: bool = True
    http_fallback_retry_ms: int = 60_000

    def with_uuid(self, agent_uuid: str) -> AgentSettings:
        """A copy with another agent UUID."""
        return replace(self, agent_uuid=agent_uuid)


_AGENT_KEYS = {f.name for f in fields(AgentSettings)} - {"config_path", "servers"} | {"server"}
_SERVER_TABLE_KEYS = {
    "name",
    "ws_url",
    "token",
    "server_uuid",
    "allow_task",
    "allow_task_type",
    "ignore_cert",
}
_ALLOW_KEYS = {f"allow_{kind}" for kind in TASK_TYPES}


def _agent_server(raw: Any, index: int) -> AgentServer:
    where = f"server[{index}]"
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: expected a table")
    unknown = set(raw) - _SERVER_TABLE_KEYS - _ALLOW_KEYS
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("ws_url", "token"):
        if key not in raw:
            raise InvalidInput(f"{where}: {key} is required")
    ws_url = _str(raw["ws_url"], f"{where}.ws_url")
    if not ws_url.startswith(("ws://", "wss://")):
        raise InvalidInput(f"{where}.ws_url: must start with ws:// or wss://")
    types = _str_list(raw.get("allow_task_type", []), f"{where}.allow_task_type")
    unknown_types = set(types) - set(TASK_TYPES)
    if unknown_types:
        raise InvalidInput(
            f"{where}.allow_task_type: unknown task type(s) {', '.join(sorted(unknown_types))}"
        )
    server_uuid = raw.get("server_uuid")
    try:
        server_uuid = canonical_uuid(server_uuid) if server_uuid else None
    except ValueError as exc:
        raise InvalidInput(f"{where}.server_uuid: {exc}") from None
    return AgentServer(
        name=_str(raw.get("name", f"server{index}"), f"{where}.name"),
        ws_url=ws_url,
        token=_str(raw["token"], f"{where}.token"),
        server_uuid=server_uuid,
        allow_task=_bool(raw.get("allow_task", True), f"{where}.allow_task"),
        allow_task_type=types,
        allow={
            k[len("allow_") :]: _bool(v, f"{where}.{k}") for k, v in raw.items() if k in _ALLOW_KEYS
        },
        ignore_cert=_bool(raw.get("ignore_cert", False), f"{where}.ignore_cert"),
    )


_REPORT_INT_BOUNDS = {
    "static_report_interval_ms": (1_000, 7 * 24 * 3600 * 1000),
    "dynamic_report_interval_ms": (100, 24 * 3600 * 1000),
    "dynamic_summary_report_interval_ms": (100, 24 * 3600 * 1000),
    "report_buffer_max_count": (0, 1_000_000),
    "report_buffer_max_age_ms": (0, 30 * 24 * 3600 * 1000),
    "report_backlog_per_second": (1, 10_000),
    "report_backlog_jitter_ms": (0, 3600 * 1000),
    "http_fallback_retry_ms": (1_000, 24 * 3600 * 1000),
}
"""Host-report settings and their ranges: short intervals would make the agent a load itself."""


def _report_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The host-report settings of an agent config, checked."""
    options: dict[str, Any] = {}
    for key, (low, high) in _REPORT_INT_BOUNDS.items():
        if key in raw:
            options[key] = _int(raw[key], key, low, high)
    for key in ("report_metrics", "http_fallback"):
        if key in raw:
            options[key] = _bool(raw[key], key)
    for key in ("dynamic_summary_select_disk", "dynamic_summary_select_network_interface"):
        if key in raw:
            options[key] = _str_list(raw[key], key)
    dynamic = options.get("dynamic_report_interval_ms", 1_000)
    summary = options.get("dynamic_summary_report_interval_ms", 1_000)
    if dynamic % summary:
        raise InvalidInput(
            f"dynamic_report_interval_ms ({dynamic}) must be a multiple of "
            f"dynamic_summary_report_interval_ms ({summary})"
        )
    return options


def parse_agent_config(text: str, path: Path | None = None) -> AgentSettings:
    """Parse and validate a whole agent config document; raise InvalidInput naming the problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"agent config is not valid TOML: {exc}") from None
    unknown = set(raw) - _AGENT_KEYS
    if unknown:
        raise InvalidInput(f"agent config: unknown key(s) {', '.join(sorted(unknown))}")
    servers = raw.get("server", [])
    if not isinstance(servers, list) or not servers:
        raise InvalidInput("agent config: needs at least one [[server]] table")
    agent_uuid = _str(raw.get("agent_uuid", "auto_gen"), "agent_uuid")
    if agent_uuid != "auto_gen":
        try:
            agent_uuid = canonical_uuid(agent_uuid)
        except ValueError as exc:
            raise InvalidInput(f"agent_uuid: {exc}") from None
    options: dict[str, Any] = {}
    for key in (
        "exec_max_character",
        "exec_timeout_ms",
        "terminal_max_session_ms",
        "connect_timeout_ms",
        "ping_interval_ms",
        "ping_timeout_ms",
        "max_concurrency",
        "max_terminals",
    ):
        if key in raw:
            options[key] = _int(raw[key], key, 1)
    for key in ("terminal_shell", "log_level", "self_update_index_url", "self_update_find_links"):
        if key in raw:
            options[key] = _str(raw[key], key)
    if "ip_echo_urls" in raw:
        options["ip_echo_urls"] = _str_list(raw["ip_echo_urls"], "ip_echo_urls")
    options.update(_report_options(raw))
    return AgentSettings(
        agent_uuid=agent_uuid,
        servers=tuple(_agent_server(s, i) for i, s in enumerate(servers)),
        config_path=path,
        **options,
    )


def persist_agent_uuid(path: Path, agent_uuid: str) -> None:
    """Write a generated agent UUID back into the config file, keeping its comments."""
    document = tomlkit.parse(path.read_text())
    document["agent_uuid"] = agent_uuid
    write_private_file(path, tomlkit.dumps(document))


def quick_agent_settings(
    ws_url: str, token: str, agent_uuid: str, allow: tuple[str, ...] = ()
) -> AgentSettings:
    """Settings for an agent started from the command line without a config file."""
    server = _agent_server(
        {"name": "server", "ws_url": ws_url, "token": token, "allow_task_type": list(allow)}, 0
    )
    return AgentSettings(agent_uuid=canonical_uuid(agent_uuid), servers=(server,))


def load_agent_settings(path: Path) -> AgentSettings:
    """Read an agent config file."""
    if not path.exists():
        raise ConfigNotFound(f"No agent config at {path}")
    return parse_agent_config(path.read_text(), path)
