"""Settings: files, overrides and validation of server and agent configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskd.config import (
    SAFE_TASK_TYPES,
    load_server_settings,
    parse_agent_config,
    persist_agent_uuid,
)
from taskd.errors import ConfigNotFound, InvalidInput
from taskd.protocol import TASK_TYPES

ROOT = Path(__file__).resolve().parent.parent


def test_example_files_are_valid() -> None:
    """config.example.toml and agent.example.toml load as they are shipped."""
    server = load_server_settings(ROOT / "config.example.toml")
    assert server.port == 2211 and server.database_url.startswith("sqlite+aiosqlite:///")
    agent = parse_agent_config((ROOT / "agent.example.toml").read_text())
    assert agent.agent_uuid == "auto_gen" and agent.servers[0].name == "main"


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    """Overrides (environment, flags) replace file values; listen splits into host and port."""
    path = tmp_path / "t.toml"
    path.write_text(
        '[server]\nserver_uuid = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"\n'
        'listen = "0.0.0.0:3000"\ndatabase_url = "sqlite:///data/x.db"\n'
    )
    settings = load_server_settings(path)
    assert (settings.host, settings.port) == ("0.0.0.0", 3000)
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path / 'data/x.db'}"
    settings = load_server_settings(path, {"port": "4000", "database_url": "postgresql://u@h/db"})
    assert settings.port == 4000
    assert settings.database_url == "postgresql+asyncpg://u@h/db"


_UUID = '[server]\nserver_uuid = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"\n'


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[server]\nserver_uuid = "x"\n', "not a valid UUID"),
        ('[server]\nserver_uuid = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"\nport = 0\n', "port"),
        ('[server]\nserver_uuid = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"\nbogus = 1\n', "bogus"),
        (
            '[server]\nserver_uuid = "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"\ntimezone = "Mars/X"\n',
            "Mars",
        ),
        ("[server\n", "t.toml"),
        (f"{_UUID}task_retention_s = 0\n", "task_retention_s: 0 is outside"),
        (f'{_UUID}cron_result_retention_s = "month"\n', "cron_result_retention_s"),
        (f"{_UUID}task_retention_by_type = {{pong = 60}}\n", "unknown task type(s) pong"),
        (f'{_UUID}task_retention_by_type = {{ping = "a"}}\n', "task_retention_by_type.ping"),
        (f"{_UUID}task_retention_by_type = {{ping = -1}}\n", "task_retention_by_type.ping"),
        (f"{_UUID}task_retention_by_type = 5\n", "task_retention_by_type: expected a table"),
        (f"{_UUID}monitoring_point_cache_bytes = -1\n", "monitoring_point_cache_bytes: -1 is"),
    ],
)
def test_bad_server_settings_are_named(tmp_path: Path, text: str, fragment: str) -> None:
    """A bad server config is refused with a message naming the setting."""
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as error:
        load_server_settings(path)
    assert fragment in error.value.message


def test_retention_settings_per_task_type(tmp_path: Path) -> None:
    """The task retention applies to every type but those given their own; an environment
    value lists type=seconds pairs."""
    path = tmp_path / "t.toml"
    path.write_text(f"{_UUID}task_retention_s = 86400\ntask_retention_by_type = {{ping = 600}}\n")
    settings = load_server_settings(path)
    assert settings.task_retention_ms("ping") == 600_000
    assert settings.task_retention_ms("execute") == 86_400_000
    assert settings.cron_result_retention_s == 30 * 86400
    settings = load_server_settings(path, {"task_retention_by_type": "tcp_ping=60, dns = 120"})
    assert settings.task_retention_ms("ping") == 86_400_000
    assert (settings.task_retention_ms("tcp_ping"), settings.task_retention_ms("dns")) == (
        60_000,
        120_000,
    )
    with pytest.raises(InvalidInput, match="type=seconds"):
        load_server_settings(path, {"task_retention_by_type": "ping"})


def test_missing_config_says_how_to_create_it(tmp_path: Path) -> None:
    """A missing file is 107 and points at `taskd init`."""
    with pytest.raises(ConfigNotFound) as error:
        load_server_settings(tmp_path / "none.toml")
    assert "taskd init" in error.value.message


def test_agent_allow_rules() -> None:
    """Safe kinds run by default, flags enable others, a whitelist overrides the flags."""
    base = '[[server]]\nws_url = "ws://127.0.0.1:1/"\ntoken = "a:b"\n'
    default = parse_agent_config(base).servers[0]
    assert {k for k in TASK_TYPES if default.allows(k)} == SAFE_TASK_TYPES
    flagged = parse_agent_config(base + "allow_execute = true\nallow_ping = false\n").servers[0]
    assert flagged.allows("execute") and not flagged.allows("ping")
    listed = parse_agent_config(
        base + 'allow_task_type = ["execute"]\nallow_ping = true\n'
    ).servers[0]
    assert listed.allows("execute") and not listed.allows("ping")
    off = parse_agent_config(base + "allow_task = false\n").servers[0]
    assert not any(off.allows(k) for k in TASK_TYPES)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "at least one [[server]]"),
        ('[[server]]\nws_url = "http://x/"\ntoken = "a:b"\n', "ws://"),
        ('[[server]]\nws_url = "ws://x/"\n', "token is required"),
        ('[[server]]\nws_url = "ws://x/"\ntoken = "a"\nallow_task_type = ["pong"]\n', "pong"),
        ('agent_uuid = "zzz"\n[[server]]\nws_url = "ws://x/"\ntoken = "a"\n', "agent_uuid"),
        ('exec_max_character = "many"\n[[server]]\nws_url = "ws://x/"\ntoken = "a"\n', "exec_max"),
    ],
)
def test_bad_agent_configs_are_named(text: str, fragment: str) -> None:
    """An invalid agent config is refused with a message naming the problem."""
    with pytest.raises(InvalidInput) as error:
        parse_agent_config(text)
    assert fragment in error.value.message


def test_generated_agent_uuid_is_written_back(tmp_path: Path) -> None:
    """persist_agent_uuid replaces auto_gen and keeps comments; the file stays 0600."""
    path = tmp_path / "agent.toml"
    path.write_text(
        '# keep me\nagent_uuid = "auto_gen"\n[[server]]\nws_url = "ws://x/"\ntoken = "a"\n'
    )
    persist_agent_uuid(path, "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f")
    text = path.read_text()
    assert "# keep me" in text
    assert parse_agent_config(text).agent_uuid == "6f1f7a5e-7a57-4d4b-9d0a-1c2b3c4d5e6f"
    assert path.stat().st_mode & 0o777 == 0o600
