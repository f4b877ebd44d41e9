"""read_config and edit_config: the agent's own config file, with its secrets kept out of results.

read_config returns the file with the value of every key whose name contains
"token", "secret" or "password" replaced by ``"***"``, comments and layout
intact. edit_config takes a whole document back; a ``"***"`` under such a key
means "keep the current value", found at the same place in the current file
(a ``[[server]]`` table is matched by its name, or by its position when it has
none, as the config does for its default names ``server0``, ``server1`` ...).
A server's secret is only kept for the same ``ws_url``: otherwise the edit
could send it to another host.

edit_config can narrow what the agent allows, never widen it: compared with
the current file, it may not turn on an ``allow_*`` flag, ``allow_task``,
``ignore_cert`` or ``report_metrics``, add kinds to or empty a non-empty ``allow_task_type``, change
or drop a ``server_uuid`` pin, or change ``terminal_shell`` or the self-update
sources. A ``[[server]]`` whose name or ws_url is new is held to the defaults.

After a successful edit_config the client reloads the file with
``load_agent_settings``; this module only guarantees the file it wrote is a
complete, valid agent config.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions

from taskd.agent.tasks import TaskContext, TaskFailed
from taskd.config import (
    SAFE_TASK_TYPES,
    AgentServer,
    AgentSettings,
    parse_agent_config,
    write_private_file,
)
from taskd.errors import InvalidInput
from taskd.protocol import (
    TASK_TYPES,
    EditConfig,
    EditConfigResult,
    ReadConfig,
    ReadConfigResult,
)

TIMEOUT_S = 10.0
REDACTED = "***"
SECRET_WORDS = ("token", "secret", "password")
FIXED_KEYS = ("terminal_shell", "self_update_index_url", "self_update_find_links")
"""Agent settings edit_config may not change: they choose what code the agent runs."""


def _is_secret(key: str) -> bool:
    """Whether a config key holds a credential."""
    return any(word in key.lower() for word in SECRET_WORDS)


async def run_read_config(task: ReadConfig, ctx: TaskContext) -> ReadConfigResult:
    """Return the agent's config file with every secret replaced by "***"."""
    path = _config_path(ctx)
    try:
        document = tomlkit.parse(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        # never fall back to the raw text: it holds the secrets
        raise TaskFailed(f"cannot read the config file {path}: {exc}") from None
    _redact(document)
    return ReadConfigResult(read_config=tomlkit.dumps(document))


async def run_edit_config(task: EditConfig, ctx: TaskContext) -> EditConfigResult:
    """Validate a whole new config, restore the secrets sent back as "***", and replace the file."""
    path = _config_path(ctx).resolve()
    try:
        parse_agent_config(task.edit_config, path)
        document = tomlkit.parse(task.edit_config)
    except InvalidInput as exc:
        raise TaskFailed(exc.message) from None
    except tomlkit.exceptions.ParseError as exc:
        raise TaskFailed(f"agent config is not valid TOML: {exc}") from None
    # Everything below is synchronous: two edits cannot interleave between
    # reading the current file and replacing it.
    try:
        old_text: str | None = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        old_text = None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFailed(f"cannot read the config file {path}: {exc}") from None
    current = _loads(old_text)
    _keep_secrets(document, current, "")
    current_servers = current.get("server", []) if current else []
    for index, server in enumerate(document.get("server", [])):
        name = server.get("name", f"server{index}")
        matched = _server_named(current_servers, name)
        if matched is not None and matched.get("ws_url") != server.get("ws_url"):
            if _has_redacted(server):
                raise TaskFailed(
                    f"edit_config: server {name} changed its ws_url; "
                    f"send its token instead of {REDACTED}"
                )
            matched = None
        _keep_secrets(server, matched, f"server[{index}].")
    if (
        document.get("agent_uuid", "auto_gen") == "auto_gen"
        and ctx.settings.agent_uuid != "auto_gen"
    ):
        # without it the agent would take a new identity at its next start
        document["agent_uuid"] = ctx.settings.agent_uuid
    text = tomlkit.dumps(document)
    try:
        edited = parse_agent_config(text, path)
    except InvalidInput as exc:
        raise TaskFailed(exc.message) from None
    widened = _widenings(_current_settings(old_text, ctx), edited)
    if widened:
        raise TaskFailed(
            "edit_config can narrow what this agent allows but not widen it: " + "; ".join(widened)
        )
    try:
        if old_text is not None:
            write_private_file(path.with_name(f"{path.name}.bak"), old_text)
        write_private_file(path, text)
    except OSError as exc:
        raise TaskFailed(f"cannot write the config file {path}: {exc}") from None
    return EditConfigResult(edit_config=True)


def _widenings(current: AgentSettings, edited: AgentSettings) -> list[str]:
    """What ``edited`` would allow that ``current`` does not, one phrase naming the key each."""
    found = [
        f"{key} would change" for key in FIXED_KEYS if getattr(edited, key) != getattr(current, key)
    ]
    if edited.report_metrics and not current.report_metrics:
        found.append("report_metrics would be enabled")
    for server in edited.servers:
        before = next(
            (s for s in current.servers if (s.name, s.ws_url) == (server.name, server.ws_url)),
            None,
        )
        label = f"server {server.name}" if before else f"new server {server.name}"
        baseline = before or AgentServer(name=server.name, ws_url=server.ws_url, token="")
        found += [f"{label}: {reason}" for reason in _server_widenings(baseline, server)]
    return found


def _server_widenings(before: AgentServer, after: AgentServer) -> list[str]:
    found = []
    if after.allow_task and not before.allow_task:
        found.append("allow_task would be enabled")
    for kind in TASK_TYPES:
        default = kind in SAFE_TASK_TYPES
        if after.allow.get(kind, default) and not before.allow.get(kind, default):
            found.append(f"allow_{kind} would be enabled")
    if before.allow_task_type:
        if not after.allow_task_type:
            found.append("allow_task_type would be emptied")
        elif set(after.allow_task_type) - set(before.allow_task_type):
            found.append("allow_task_type would allow more kinds")
    elif any(not before.allows(kind) for kind in after.allow_task_type):
        found.append("allow_task_type would allow more kinds")
    if after.ignore_cert and not before.ignore_cert:
        found.append("ignore_cert would be enabled")
    if before.server_uuid is not None and after.server_uuid != before.server_uuid:
        found.append("server_uuid would change")
    return found


def _current_settings(old_text: str | None, ctx: TaskContext) -> AgentSettings:
    """The file being replaced, or the running settings when it is missing or invalid."""
    if old_text is not None:
        try:
            return parse_agent_config(old_text)
        except InvalidInput:
            pass
    return ctx.settings


def _config_path(ctx: TaskContext) -> Path:
    if ctx.settings.config_path is None:
        raise TaskFailed("this agent runs without a config file")
    return ctx.settings.config_path


def _redact(table: Any) -> None:
    for key in list(table.keys()):
        value = table[key]
        if isinstance(value, Mapping):
            _redact(value)
        elif _is_secret(key):
            table[key] = REDACTED
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    _redact(item)


def _loads(text: str | None) -> dict[str, Any] | None:
    """The current file's values, or None when there is no readable current file."""
    if text is None:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def _server_named(servers: Any, name: str) -> Mapping[str, Any] | None:
    if not isinstance(servers, list):
        return None
    for index, server in enumerate(servers):
        if isinstance(server, Mapping) and server.get("name", f"server{index}") == name:
            return server
    return None


def _has_redacted(table: Any) -> bool:
    """Whether any secret in ``table`` (or a table nested in it) is "***"."""
    for key, value in table.items():
        if isinstance(value, Mapping):
            if _has_redacted(value):
                return True
        elif value == REDACTED and _is_secret(key):
            return True
    return False


def _keep_secrets(table: Any, current: Mapping[str, Any] | None, where: str) -> None:
    """Replace each "***" secret of ``table`` by the value at the same place in ``current``."""
    for key in list(table.keys()):
        value = table[key]
        if isinstance(value, Mapping):
            nested = current.get(key) if current is not None else None
            _keep_secrets(value, nested if isinstance(nested, Mapping) else None, f"{where}{key}.")
        elif value == REDACTED and _is_secret(key):
            if current is None or key not in current:
                raise TaskFailed(
                    f'{where}{key} is "{REDACTED}" but the current config has no value to keep'
                )
            table[key] = current[key]
