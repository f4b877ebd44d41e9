"""Server settings from the config file, ``TASKD_*`` variables and flags; logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from taskd.config import (
    SERVER_KEYS,
    ServerSettings,
    load_server_settings,
)

logger = logging.getLogger("taskd")


DEFAULT_CONFIG = "taskd.toml"


def configure_logging(level: str) -> None:
    """Log one line per event to stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # at DEBUG these log every frame and SQL parameter: keystrokes, tokens, task tokens
    root = logging.getLogger().level
    logging.getLogger("uvicorn.error").setLevel(max(logging.INFO, root))
    for chatty in ("aiosqlite", "websockets", "sqlalchemy.engine"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root))


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("TASKD_CONFIG") or DEFAULT_CONFIG)


def _env_overrides() -> dict[str, str]:
    """The TASKD_* variables that name a server setting, keyed by that setting.

    Other TASKD_* variables belong to other commands (TASKD_URL, TASKD_AGENT_CONFIG ...)
    or to other tools, so they are left alone.
    """
    return {
        key: value
        for name, value in os.environ.items()
        if name.startswith("TASKD_") and (key := name[len("TASKD_") :].lower()) in SERVER_KEYS
    }


def warn_misspelt_env() -> None:
    """Name each TASKD_* variable that looks like a misspelt server setting: it changes nothing."""
    import difflib

    for name in sorted(os.environ):
        if not name.startswith("TASKD_"):
            continue
        key = name[len("TASKD_") :].lower()
        close = difflib.get_close_matches(key, SERVER_KEYS, n=1, cutoff=0.8)
        if key not in SERVER_KEYS and close:
            logger.warning(
                "ignoring %s: not a server setting (did you mean TASKD_%s?)",
                name,
                close[0].upper(),
            )


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """Settings from the file, then TASKD_* variables, then flags.

    ``--port 0`` asks for a free port for this one run (serve logs the port it got); in
    the file or TASKD_PORT, which name the port agents are configured with, 0 is refused.
    """
    overrides: dict[str, Any] = _env_overrides()
    any_port = getattr(args, "port", None) == 0
    for flag in ("host", "port", "database"):
        value = getattr(args, flag, None)
        if value is not None and not (flag == "port" and any_port):
            overrides["database_url" if flag == "database" else flag] = value
    settings = load_server_settings(config_path(args), overrides)
    return replace(settings, port=0) if any_port else settings
