"""The ``taskd`` command: init, serve, agent, agents, alert, demo, call, cron, token, schemas.

This package is the only code that reads the environment: ``TASKD_*`` variables
override the config file, command-line flags override both.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from taskd import __version__
from taskd.cli.agent import add_agent_commands, cmd_agent, run_agent
from taskd.cli.agents import add_agents_commands
from taskd.cli.alert import add_alert_commands
from taskd.cli.call import cmd_call
from taskd.cli.client import DEFAULT_URL
from taskd.cli.cron import add_cron_commands
from taskd.cli.demo import cmd_demo
from taskd.cli.server import cmd_init, cmd_schemas, cmd_serve
from taskd.cli.settings import DEFAULT_CONFIG
from taskd.cli.token import add_token_commands
from taskd.errors import TaskdError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="taskd", description="Task orchestration for server fleets."
    )
    parser.add_argument("--version", action="version", version=f"taskd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create config, database schema and super token")
    init.add_argument(
        "--config", help=f"config file (default ${{TASKD_CONFIG}} or {DEFAULT_CONFIG})"
    )
    init.add_argument("--database", help="database URL (overrides the file)")
    init.add_argument("--json", action="store_true", help="print one JSON object")
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument(
        "--config", help=f"config file (default ${{TASKD_CONFIG}} or {DEFAULT_CONFIG})"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="0: a free port, logged once bound")
    serve.add_argument("--database", help="database URL")
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("agent", help="run the agent (on each managed server)")
    agent.add_argument("--config", help="agent config (default $TASKD_AGENT_CONFIG or agent.toml)")
    agent.add_argument("--server", help="quick form: server URL ws://HOST:PORT/ (no config file)")
    agent.add_argument("--token", help="quick form: the agent's token KEY:SECRET")
    agent.add_argument("--uuid", help="quick form: agent UUID (default: generated and kept)")
    agent.add_argument("--allow", help="quick form: task kinds to allow, comma-separated")
    agent.add_argument("--state-dir", help="where the result spool lives")
    agent.add_argument("--log-level")
    agent.set_defaults(func=cmd_agent)
    add_agent_commands(agent)

    demo = sub.add_parser("demo", help="start a server and a local agent; show a round trip")
    demo.add_argument("--dir", default="var", help="where config, database and logs go")
    demo.add_argument("--port", type=int)
    demo.add_argument("--once", action="store_true", help="stop after the round trip")
    demo.set_defaults(func=cmd_demo)

    call = sub.add_parser("call", help="make one JSON-RPC call")
    call.add_argument("method")
    call.add_argument("params", nargs="?", help="params as JSON (array or object)")
    call.add_argument("--url", help=f"server URL (default $TASKD_URL or {DEFAULT_URL})")
    call.add_argument("--token", help="token (default $TASKD_TOKEN)")
    call.add_argument("--timeout", type=float, default=330.0)
    call.set_defaults(func=cmd_call)

    add_agents_commands(sub)
    add_alert_commands(sub)
    add_cron_commands(sub)
    add_token_commands(sub)

    schemas = sub.add_parser("schemas", help="write the JSON Schemas and openrpc.json")
    schemas.add_argument("--dir", default="schemas")
    schemas.add_argument("--check", action="store_true", help="fail if the files are stale")
    schemas.set_defaults(func=cmd_schemas)
    return parser


LONG_RUNNING = (cmd_serve, cmd_agent, run_agent, cmd_demo)
"""Commands that must survive a vanished peer: SIGPIPE stays ignored for them."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func not in LONG_RUNNING:
        # `taskd call ... | head` should end quietly; a server or agent must never
        # die because a peer closed its socket while being written to
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code: int = args.func(args)
    except TaskdError as exc:
        print(f"taskd: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
