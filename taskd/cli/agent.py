"""``taskd agent``: run the agent, or enroll it with a server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from taskd.cli.client import CallFailed, client_command, post_rpc, server_urls
from taskd.cli.settings import configure_logging, logger


def _agent_settings(args: argparse.Namespace) -> tuple[Any, Path]:
    import uuid as uuid_module

    from taskd.config import (
        load_agent_settings,
        persist_agent_uuid,
        quick_agent_settings,
    )

    if args.server:
        if not args.token:
            raise SystemExit("taskd agent: --server needs --token (KEY:SECRET)")
        state_root = Path(
            args.state_dir or os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")
        )
        state = state_root / "taskd-agent"
        uuid_file = state / "agent_uuid"
        agent_uuid = args.uuid
        if agent_uuid is None and uuid_file.exists():
            agent_uuid = uuid_file.read_text().strip()
        if agent_uuid is None:
            agent_uuid = str(uuid_module.uuid4())
            state.mkdir(parents=True, exist_ok=True)
            uuid_file.write_text(agent_uuid + "\n")
        allow = tuple(k.strip() for k in (args.allow or "").split(",") if k.strip())
        url = args.server.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return quick_agent_settings(url, args.token, agent_uuid, allow), state / agent_uuid
    path = Path(args.config or os.environ.get("TASKD_AGENT_CONFIG") or "agent.toml")
    settings = load_agent_settings(path)
    if settings.agent_uuid == "auto_gen":
        generated = str(uuid_module.uuid4())
        persist_agent_uuid(path, generated)
        settings = settings.with_uuid(generated)
    state_dir = Path(args.state_dir) if args.state_dir else path.parent / f"{path.stem}.state"
    return settings, state_dir


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    from taskd.agent.client import Agent

    settings, state_dir = _agent_settings(args)
    configure_logging(args.log_level or settings.log_level)
    logger.info("agent %s starting (%d server(s))", settings.agent_uuid, len(settings.servers))

    async def main() -> None:
        agent = Agent(settings, state_dir)
        runner = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runner.cancel)  # type: ignore[union-attr]
        for signum in (signal.SIGHUP, signal.SIGQUIT):
            if signal.getsignal(signum) == signal.SIG_IGN:
                # still ignored by the agent, but caught: a caught signal is reset to its
                # default at exec, so commands and shells do not inherit nohup's SIG_IGN
                loop.add_signal_handler(signum, lambda: None)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    asyncio.run(main())
    logger.info("agent stopped")
    return 0


def cmd_agent_enroll(args: argparse.Namespace) -> int:
    """Enroll this machine with a server and write a ready agent config (mode 0600)."""
    from urllib.parse import urlsplit

    import tomlkit

    from taskd.config import parse_agent_config, write_private_file

    token = args.enroll_token or os.environ.get("TASKD_ENROLL_TOKEN")
    if not args.server or not token:
        raise CallFailed("needs --server URL and --enroll-token KEY:SECRET", 2)
    path = Path(args.config or os.environ.get("TASKD_AGENT_CONFIG") or "agent.toml")
    if path.exists() and not args.force:
        raise CallFailed(f"{path} already exists; pass --force to replace it", 2)
    http_url, ws_url = server_urls(args.server)
    server_uuid = post_rpc(http_url, "server_uuid", [])
    enrolled = post_rpc(
        http_url, "agent_enroll", {"token": token} | ({"uuid": args.uuid} if args.uuid else {})
    )
    name = urlsplit(ws_url).hostname or "server"
    document = tomlkit.document()
    document.add(
        tomlkit.comment(f"taskd agent enrolled with {name}; agent.example.toml has every key")
    )
    document["agent_uuid"] = enrolled["uuid"]
    link = tomlkit.table()
    link["name"] = name
    link["ws_url"] = ws_url
    link["token"] = enrolled["token"]
    link["server_uuid"] = server_uuid
    allow = [kind.strip() for kind in (args.allow or "").split(",") if kind.strip()]
    if allow:
        link["allow_task_type"] = allow
    servers = tomlkit.aot()
    servers.append(link)
    document["server"] = servers
    text = tomlkit.dumps(document)
    parse_agent_config(text, path)
    write_private_file(path, text)
    print(f"enrolled agent {enrolled['uuid']} with {ws_url}; wrote {path}")
    print(f"start it with: taskd agent --config {path}")
    return 0


def run_agent(args: argparse.Namespace) -> int:
    if args.action == "enroll":
        code: int = client_command("taskd agent enroll", cmd_agent_enroll)(args)
        return code
    return cmd_agent(args)


def add_agent_commands(agent: argparse.ArgumentParser) -> None:
    """``taskd agent enroll --server URL --enroll-token T [--config F] [--uuid U] [--force]``."""
    agent.add_argument(
        "action", nargs="?", choices=["enroll"], help="enroll: register with a server, write config"
    )
    agent.add_argument("--enroll-token", help="enroll: a token with the enroll role")
    agent.add_argument("--force", action="store_true", help="enroll: replace an existing config")
    agent.set_defaults(func=run_agent)
