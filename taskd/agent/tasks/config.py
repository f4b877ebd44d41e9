"""read_config and edit_config: the agent's own config file, with its secrets kept out of results.

read_config returns the file with the value of every key whose name contains
"token", "secret" or "password" replaced by ``"***"``, comments and layout
intact. edit_config takes a whole document back; a ``"***"`` under such a key
means "keep the current value", found at the same place in the current file
(a ``[[server]]`` table is matched by its name, or by its position when it has
none, as the config does for its default names ``server0``, ``server1`` ...).

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
from taskd.config import parse_agent_config, write_private_file
from taskd.errors import InvalidInput
from taskd.protocol import EditConfig, EditConfigResult, ReadConfig, ReadConfigResult

TIMEOUT_S = 10.0
REDACTED = "***"
SECRET_WORDS = ("token", "secret", "password")


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
        _keep_secrets(server, _server_named(current_servers, name), f"server[{index}].")
    if (
        document.get("agent_uuid", "auto_gen") == "auto_gen"
        and ctx.settings.agent_uuid != "auto_gen"
    ):
        # without it the agent would take a new identity at its next start
        document["agent_uuid"] = ctx.settings.agent_uuid
    text = tomlkit.dumps(document)
    try:
        parse_agent_config(text, path)
    except InvalidInput as exc:
        raise TaskFailed(exc.message) from None
    try:
        if old_text is not None:
            write_private_file(path.with_name(f"{path.name}.bak"), old_text)
        write_private_file(path, text)
    except OSError as exc:
        raise TaskFailed(f"cannot write the config file {path}: {exc}") from None
    return EditConfigResult(edit_config=True)


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
