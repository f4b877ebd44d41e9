"""read_config and edit_config against real config files."""

from __future__ import annotations

import re
import stat
import tomllib
from pathlib import Path

import pytest

from taskd.agent.tasks import TaskContext, TaskFailed, runner_for
from taskd.agent.tasks.config import TIMEOUT_S, run_edit_config, run_read_config
from taskd.config import (
    AgentSettings,
    load_agent_settings,
    parse_agent_config,
    quick_agent_settings,
)
from taskd.protocol import TASK_TYPES, EditConfig, ReadConfig, parse_task_event_type

AGENT_UUID = "0b7c4a9e-2f61-4d3b-9a8e-5c1d7e3f2a64"
SECRET_MAIN = "KEY:main-secret-6f1a"
SECRET_BACKUP = "backup-secret-93c2"

CONFIG = f"""\
# the agent of host 7
agent_uuid = "{AGENT_UUID}"
exec_timeout_ms = 60000  # a minute

# the primary server
[[server]]
name = "main"
ws_url = "ws://127.0.0.1:2211/"
token = "{SECRET_MAIN}"  # rolled in March
allow_execute = true

[[server]]
ws_url = "ws://127.0.0.1:2212/"
token = '{SECRET_BACKUP}'
"""


def _context(path: Path) -> TaskContext:
    """A context from the real config file at ``path``."""
    settings = load_agent_settings(path)
    return TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """An agent config file with two servers, comments and secrets."""
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG)
    path.chmod(0o644)
    return path


def _read_task() -> ReadConfig:
    task = parse_task_event_type("read_config")
    assert isinstance(task, ReadConfig)
    return task


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _read(path: Path) -> str:
    return (await run_read_config(_read_task(), _context(path))).read_config


async def _edit(path: Path, text: str) -> None:
    # built without the wire check: a server that does not check the TOML (NodeGet's does
    # not) hands the agent anything, so the agent's own validation is what is tested here
    task = EditConfig.model_construct(edit_config=text)
    result = await run_edit_config(task, _context(path))
    assert result.edit_config is True


def test_interface_finds_runners(config_file: Path) -> None:
    """The client finds both runners of this module and their 10 s limit."""
    settings = load_agent_settings(config_file)
    assert runner_for("read_config", settings) == (run_read_config, TIMEOUT_S)
    assert runner_for("edit_config", settings) == (run_edit_config, TIMEOUT_S)
    assert TIMEOUT_S == 10.0


async def test_read_redacts_tokens_and_keeps_the_rest(config_file: Path) -> None:
    """Tokens come back as "***", nowhere in clear, with every other key and comment intact."""
    text = await _read(config_file)
    assert SECRET_MAIN not in text
    assert SECRET_BACKUP not in text
    assert "main-secret" not in text and "backup-secret" not in text
    for comment in ("# the agent of host 7", "# a minute", "# the primary server", "# rolled"):
        assert comment in text
    expected = tomllib.loads(CONFIG)
    for server in expected["server"]:
        server["token"] = "***"
    assert tomllib.loads(text) == expected


async def test_read_redacts_secret_and_password_keys_anywhere(config_file: Path) -> None:
    """Any key naming a token, secret or password is redacted, in nested tables and arrays too."""
    context = _context(config_file)
    # the file on disk need not be a valid config for read_config: it shows what is there
    _write(
        config_file,
        CONFIG
        + 'db_password = "pw-1"\n'
        + 'extra = { Client_Secret = "cs-2", api_tokens = ["tk-3", "tk-4"], keep = "visible" }\n'
        + '[[server.hooks]]\nauth_token = "tk-5"\n',
    )
    text = (await run_read_config(_read_task(), context)).read_config
    for secret in ("pw-1", "cs-2", "tk-3", "tk-4", "tk-5", SECRET_MAIN, SECRET_BACKUP):
        assert secret not in text
    values = tomllib.loads(text)
    assert values["server"][1]["db_password"] == "***"
    assert values["server"][1]["extra"] == {
        "Client_Secret": "***",
        "api_tokens": "***",
        "keep": "visible",
    }
    assert values["server"][1]["hooks"] == [{"auth_token": "***"}]


async def test_without_a_config_file_both_kinds_fail(tmp_path: Path) -> None:
    """An agent started without a config file refuses to read or edit one."""
    settings = quick_agent_settings("ws://127.0.0.1:1/", "KEY:SECRET", AGENT_UUID)
    ctx = TaskContext(settings=settings, server=settings.servers[0], task_id=1, task_token="x")
    with pytest.raises(TaskFailed, match=r"^this agent runs without a config file$"):
        await run_read_config(_read_task(), ctx)
    with pytest.raises(TaskFailed, match=r"^this agent runs without a config file$"):
        await run_edit_config(EditConfig(edit_config=CONFIG), ctx)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("agent_uuid = [unclosed\n", "not valid TOML"),
        ('[[server]]\ntoken = "t"\n', "server[0]: ws_url is required"),
        ('exec_timeout_ms = "soon"\n[[server]]\nws_url = "ws://h/"\ntoken = "t"\n', "integer"),
        ('surprise = 1\n[[server]]\nws_url = "ws://h/"\ntoken = "t"\n', "unknown key"),
    ],
)
async def test_invalid_document_leaves_the_file_untouched(
    config_file: Path, document: str, reason: str
) -> None:
    """An invalid document fails with the parser's reason and leaves the file byte-identical."""
    before = _bytes(config_file)
    with pytest.raises(TaskFailed, match=re.escape(reason)):
        await _edit(config_file, document)
    assert _bytes(config_file) == before
    assert not config_file.with_name("agent.toml.bak").exists()


async def test_redacted_tokens_keep_the_current_secrets(config_file: Path) -> None:
    """Sending back the read text with one change keeps both secrets and applies the change."""
    text = await _read(config_file)
    await _edit(config_file, text.replace("exec_timeout_ms = 60000", "exec_timeout_ms = 5000"))
    settings = load_agent_settings(config_file)
    assert settings.exec_timeout_ms == 5000
    assert [s.token for s in settings.servers] == [SECRET_MAIN, SECRET_BACKUP]
    written = _bytes(config_file).decode()
    assert "# rolled in March" in written
    assert "# the agent of host 7" in written


async def test_servers_are_matched_by_name_not_order(config_file: Path) -> None:
    """Reordered servers each keep their own secret: by name, or by position when unnamed."""
    document = f"""\
agent_uuid = "{AGENT_UUID}"
[[server]]
name = "server1"
ws_url = "ws://127.0.0.1:2212/"
token = "***"
[[server]]
name = "main"
ws_url = "ws://127.0.0.1:2211/"
token = "***"
"""
    await _edit(config_file, document)
    servers = load_agent_settings(config_file).servers
    assert [(s.name, s.token) for s in servers] == [
        ("server1", SECRET_BACKUP),
        ("main", SECRET_MAIN),
    ]


async def test_redacted_token_without_a_current_value_fails(config_file: Path) -> None:
    """A "***" token for a server the current file does not have fails and changes nothing."""
    before = _bytes(config_file)
    document = '[[server]]\nname = "new"\nws_url = "ws://127.0.0.1:9/"\ntoken = "***"\n'
    with pytest.raises(TaskFailed, match=r'server\[0\]\.token is "\*\*\*"'):
        await _edit(config_file, document)
    assert _bytes(config_file) == before


async def test_new_token_replaces_the_secret(config_file: Path) -> None:
    """A token given in clear replaces the old one."""
    text = (await _read(config_file)).replace('token = "***"  #', 'token = "KEY:rolled"  #', 1)
    await _edit(config_file, text)
    servers = load_agent_settings(config_file).servers
    assert [s.token for s in servers] == ["KEY:rolled", SECRET_BACKUP]


async def test_edit_keeps_a_backup_and_private_modes(config_file: Path) -> None:
    """The old file is kept byte for byte as .bak; both files end up readable by the owner only."""
    before = _bytes(config_file)
    await _edit(config_file, await _read(config_file))
    backup = config_file.with_name("agent.toml.bak")
    assert _bytes(backup) == before
    assert _mode(config_file) == 0o600
    assert _mode(backup) == 0o600
    # no temporary file is left behind
    assert sorted(p.name for p in config_file.parent.iterdir()) == ["agent.toml", "agent.toml.bak"]


async def test_omitted_agent_uuid_keeps_the_identity(config_file: Path) -> None:
    """A document without agent_uuid still gets the running agent's UUID written into it."""
    document = (
        f'[[server]]\nname = "main"\nws_url = "ws://127.0.0.1:2211/"\ntoken = "{SECRET_MAIN}"\n'
    )
    await _edit(config_file, document)
    settings = load_agent_settings(config_file)
    assert settings.agent_uuid == AGENT_UUID
    assert [s.token for s in settings.servers] == [SECRET_MAIN]


async def test_written_file_round_trips_through_read(config_file: Path) -> None:
    """After an edit the file parses as a config, and reading it again redacts the same way."""
    first = await _read(config_file)
    await _edit(config_file, first)
    load_agent_settings(config_file)
    assert await _read(config_file) == first


SERVER_UUID = "5d0f2b8e-7c1a-4e3b-9f60-2a8d4c6b1e73"


def _config(main: str = "", top: str = "", token: str = SECRET_MAIN, extra: str = "") -> str:
    """An agent config with one server "main" carrying the lines ``main``."""
    return (
        f'agent_uuid = "{AGENT_UUID}"\n{top}\n[[server]]\nname = "main"\n'
        f'ws_url = "ws://127.0.0.1:2211/"\ntoken = "{token}"\n{main}\n{extra}'
    )


async def _refused(path: Path, text: str) -> str:
    """Run edit_config with ``text``, expect it to fail, and return the reason."""
    task = parse_task_event_type({"edit_config": text})
    assert isinstance(task, EditConfig)
    with pytest.raises(TaskFailed) as failed:
        await run_edit_config(task, _context(path))
    return str(failed.value)


async def test_token_is_not_kept_for_a_server_whose_ws_url_changed(config_file: Path) -> None:
    """A "***" token under a changed ws_url is refused, so no edit can send a secret elsewhere."""
    before = _bytes(config_file)
    text = await _read(config_file)
    to_attacker = text.replace("ws://127.0.0.1:2211/", "ws://collector.example:80/")
    reason = await _refused(config_file, to_attacker)
    assert reason == "edit_config: server main changed its ws_url; send its token instead of ***"
    unnamed_moved = text.replace("ws://127.0.0.1:2212/", "ws://collector.example:80/")
    reason = await _refused(config_file, unnamed_moved)
    assert reason == (
        "edit_config: server server1 changed its ws_url; send its token instead of ***"
    )
    assert _bytes(config_file) == before
    assert not config_file.with_name("agent.toml.bak").exists()


async def test_moved_server_takes_a_new_token_in_clear(config_file: Path) -> None:
    """A server may move to a new ws_url when its token is sent in clear, with default rights."""
    text = (await _read(config_file)).replace("allow_execute = true\n", "")
    moved = text.replace("ws://127.0.0.1:2211/", "ws://10.0.0.5:2211/").replace(
        'token = "***"  #', 'token = "KEY:new-host"  #', 1
    )
    await _edit(config_file, moved)
    servers = load_agent_settings(config_file).servers
    assert [(s.ws_url, s.token) for s in servers] == [
        ("ws://10.0.0.5:2211/", "KEY:new-host"),
        ("ws://127.0.0.1:2212/", SECRET_BACKUP),
    ]


@pytest.mark.parametrize(
    ("current", "edited", "reason"),
    [
        (_config(), _config("allow_execute = true"), "server main: allow_execute would be enabled"),
        (_config("allow_ping = false"), _config(), "server main: allow_ping would be enabled"),
        (
            _config("allow_task = false"),
            _config("allow_task = true"),
            "server main: allow_task would be enabled",
        ),
        (
            _config('allow_task_type = ["ping"]'),
            _config('allow_task_type = ["ping", "execute"]'),
            "server main: allow_task_type would allow more kinds",
        ),
        (
            _config('allow_task_type = ["ping"]'),
            _config(),
            "server main: allow_task_type would be emptied",
        ),
        (
            _config(),
            _config('allow_task_type = ["ping", "web_shell"]'),
            "server main: allow_task_type would allow more kinds",
        ),
        (
            _config('allow_task_type = ["ping"]'),
            _config('allow_task_type = ["ping"]\nallow_execute = true'),
            "server main: allow_execute would be enabled",
        ),
        (_config(), _config("ignore_cert = true"), "server main: ignore_cert would be enabled"),
        (
            _config(f'server_uuid = "{SERVER_UUID}"'),
            _config(),
            "server main: server_uuid would change",
        ),
        (_config(), _config(top='terminal_shell = "/bin/bash"'), "terminal_shell would change"),
        (
            _config(),
            _config(top='self_update_index_url = "https://pypi.example/simple"'),
            "self_update_index_url would change",
        ),
        (
            _config(top='self_update_find_links = "/srv/wheels"'),
            _config(top='self_update_find_links = "/tmp/wheels"'),
            "self_update_find_links would change",
        ),
        (_config(top="report_metrics = false"), _config(), "report_metrics would be enabled"),
        (
            _config(),
            _config(
                extra='[[server]]\nname = "extra"\nws_url = "ws://10.9.9.9:1/"\ntoken = "K:S"\n'
                "allow_execute = true\n"
            ),
            "new server extra: allow_execute would be enabled",
        ),
        (
            _config("allow_execute = true"),
            _config("allow_execute = true").replace("127.0.0.1:2211", "10.9.9.9:2211"),
            "new server main: allow_execute would be enabled",
        ),
    ],
)
async def test_edit_config_cannot_widen_what_the_agent_allows(
    tmp_path: Path, current: str, edited: str, reason: str
) -> None:
    """An edit that would let a server run more, or change what code runs, fails naming the key."""
    path = tmp_path / "agent.toml"
    path.write_text(current)
    before = _bytes(path)
    message = await _refused(path, edited)
    assert message.startswith("edit_config can narrow what this agent allows but not widen it: ")
    assert reason in message.split(": ", 1)[1].split("; ")
    assert _bytes(path) == before
    assert not path.with_name("agent.toml.bak").exists()


@pytest.mark.parametrize(
    ("current", "edited"),
    [
        (_config("allow_execute = true"), _config("allow_execute = false")),
        (
            _config("allow_execute = true\nallow_web_shell = true"),
            _config("allow_web_shell = true"),
        ),
        (_config(), _config("allow_ping = false\nallow_dns = false")),
        (_config(), _config('allow_task_type = ["ping"]')),
        (_config('allow_task_type = ["ping", "dns"]'), _config('allow_task_type = ["dns"]')),
        (_config("allow_execute = true"), _config("allow_task = false\nallow_execute = true")),
        (_config("ignore_cert = true"), _config()),
        (_config(), _config(f'server_uuid = "{SERVER_UUID}"')),
        (_config(top="exec_timeout_ms = 60000"), _config(top="exec_timeout_ms = 5000")),
        (_config(), _config(top="report_metrics = false")),
        (
            _config(
                extra='[[server]]\nname = "b"\nws_url = "ws://10.1.1.1:1/"\ntoken = "K:S"\n'
                "allow_execute = true\n"
            ),
            _config(),
        ),
    ],
)
async def test_edit_config_can_narrow_what_the_agent_allows(
    tmp_path: Path, current: str, edited: str
) -> None:
    """Turning allowances off and changing other settings is applied; nothing new is allowed."""
    path = tmp_path / "agent.toml"
    path.write_text(current)
    await _edit(path, edited.replace(SECRET_MAIN, "***"))
    before = parse_agent_config(current)
    after = load_agent_settings(path)
    assert after == parse_agent_config(edited, path)
    assert after.servers[0].token == SECRET_MAIN
    for kind in TASK_TYPES:
        if after.servers[0].allows(kind):
            assert before.servers[0].allows(kind), kind


def test_example_config_shows_the_defaults() -> None:
    """agent.example.toml parses, and every setting it shows is the built-in default."""
    example = Path(__file__).parents[2] / "agent.example.toml"
    settings = load_agent_settings(example)
    defaults = AgentSettings(agent_uuid="auto_gen", servers=settings.servers, config_path=example)
    assert settings == defaults
    assert settings.terminal_shell == "/bin/sh"
