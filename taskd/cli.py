"""The ``taskd`` command: init, serve, call, schemas (and agent, cron, token).

This is the only module that reads the environment: ``TASKD_*`` variables
override the config file, command-line flags override both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from taskd import __version__
from taskd.config import (
    SERVER_KEYS,
    ServerSettings,
    load_server_settings,
    write_default_server_config,
)
from taskd.errors import ErrorCode, TaskdError

logger = logging.getLogger("taskd")

DEFAULT_CONFIG = "taskd.toml"
DEFAULT_URL = "http://127.0.0.1:2211/"


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


def _config_path(args: argparse.Namespace) -> Path:
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


def _warn_misspelt_env() -> None:
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
    settings = load_server_settings(_config_path(args), overrides)
    return replace(settings, port=0) if any_port else settings


# --------------------------------------------------------------------------- init


async def _init_database(settings: ServerSettings) -> str | None:
    from taskd.auth import ensure_super_token
    from taskd.store import Store

    async with Store(settings.database_url, pool_size=2) as store:
        await store.migrate()
        return await ensure_super_token(store)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the config (if missing), the schema and the super token."""
    _warn_misspelt_env()
    path = _config_path(args)
    created = not path.exists()
    if created:
        write_default_server_config(path)
    settings = server_settings(args)
    if settings.is_sqlite:
        db_file = Path(settings.database_url.split("///", 1)[1])
        db_file.parent.mkdir(parents=True, exist_ok=True)
    super_token = asyncio.run(_init_database(settings))
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(path),
                    "server_uuid": settings.server_uuid,
                    "super_token": super_token,
                }
            )
        )
        return 0
    print(f"{'wrote' if created else 'using'} config {path}")
    print(f"server uuid: {settings.server_uuid}")
    if super_token is None:
        print("a super token already exists; it was not replaced")
    else:
        print(f"super token (shown once, keep it safe): {super_token}")
    return 0


# --------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT."""
    from taskd.config import ensure_node_id
    from taskd.server import serve

    settings = ensure_node_id(server_settings(args))
    configure_logging(settings.log_level)
    _warn_misspelt_env()
    return 0 if serve(settings) else 1


# --------------------------------------------------------------------------- agent


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


# --------------------------------------------------------------------------- demo


def _demo_tokens(settings: ServerSettings, agent_uuid: str, path: Path) -> dict[str, str]:
    """An agent token and a caller token for the demo, created once and kept in ``path``."""
    from taskd.config import write_private_file

    if path.exists():
        tokens: dict[str, str] = json.loads(path.read_text())
        return tokens

    async def create() -> dict[str, str]:
        from taskd.auth import NewToken, hash_secret
        from taskd.roles import agent_limits
        from taskd.store import Store

        made: dict[str, str] = {}
        roles = {
            "agent": agent_limits(agent_uuid),
            "caller": [
                {
                    "scopes": ["global"],
                    "permissions": [
                        {"task": {"create": "*"}},
                        {"task": {"read": "*"}},
                        {"agent": "list"},
                    ],
                }
            ],
        }
        async with Store(settings.database_url, pool_size=2) as store:
            for role, limits in roles.items():
                token = NewToken.generate()
                await store.insert_token(
                    {
                        "key": token.key,
                        "secret_hash": hash_secret(token.secret),
                        "limits": limits,
                        "description": f"demo {role}",
                    }
                )
                made[role] = str(token)
        return made

    tokens = asyncio.run(create())
    write_private_file(path, json.dumps(tokens))
    return tokens


def _wait_for(check: Any, what: str, seconds: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"taskd demo: {what} did not come up within {seconds:.0f} s")


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a server and a local agent, show one task round trip, keep both running."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "taskd.toml"
    init_args = argparse.Namespace(config=str(config), json=False, database=None)
    if not config.exists():
        cmd_init(init_args)
    settings = server_settings(init_args)
    port = args.port or settings.port
    agent_uuid, agent_config, tokens = _demo_agent(settings, directory, port)
    processes = _demo_processes(directory, config, port, agent_config)
    try:
        _demo_round_trip(directory, port, tokens["caller"], agent_uuid)
        print("Ctrl-C stops the server and the agent.")
        if not args.once:
            processes[0].wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)


def _demo_agent(
    settings: ServerSettings, directory: Path, port: int
) -> tuple[str, Path, dict[str, str]]:
    """The demo agent's UUID, config (written once, every task kind allowed) and tokens."""
    import uuid as uuid_module

    import tomlkit

    from taskd.config import write_private_file

    agent_config = directory / "agent.toml"
    if agent_config.exists():
        agent_uuid = str(tomlkit.parse(agent_config.read_text())["agent_uuid"])
    else:
        agent_uuid = str(uuid_module.uuid4())
    tokens = _demo_tokens(settings, agent_uuid, directory / "demo-tokens.json")
    if not agent_config.exists():
        document = tomlkit.document()
        document.add(
            tomlkit.comment("demo agent: every task kind allowed (see agent.example.toml)")
        )
        document["agent_uuid"] = agent_uuid
        link = tomlkit.table()
        link["name"] = "local"
        link["ws_url"] = f"ws://127.0.0.1:{port}/"
        link["token"] = tokens["agent"]
        link["allow_task_type"] = list(_all_kinds())
        servers = tomlkit.aot()
        servers.append(link)
        document["server"] = servers
        write_private_file(agent_config, tomlkit.dumps(document))
    return agent_uuid, agent_config, tokens


def _demo_processes(
    directory: Path, config: Path, port: int, agent_config: Path
) -> list[subprocess.Popen[bytes]]:
    """``taskd serve`` and ``taskd agent`` as child processes, logging into ``directory``."""
    base = [sys.executable, "-m", "taskd"]
    commands = {
        "server": ["serve", "--config", str(config), "--port", str(port)],
        "agent": ["agent", "--config", str(agent_config)],
    }
    processes = []
    for name, command in commands.items():
        with (directory / f"{name}.log").open("a") as log:
            processes.append(
                subprocess.Popen([*base, *command], stdout=log, stderr=subprocess.STDOUT)
            )
    return processes


def _demo_round_trip(directory: Path, port: int, caller: str, agent_uuid: str) -> None:
    """Wait for the server and the agent, then run three tasks and print their results."""
    import httpx

    url = f"http://127.0.0.1:{port}/"
    client = httpx.Client(base_url=url, timeout=30)

    def call(method: str, *params: Any) -> Any:
        reply = client.post(
            "/", json={"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}
        ).json()
        if "error" in reply:
            raise SystemExit(f"taskd demo: {method} failed: {reply['error']}")
        return reply["result"]

    _wait_for(lambda: client.get("/healthz").status_code == 200, "the server")
    _wait_for(
        lambda: any(a["uuid"] == agent_uuid and a["online"] for a in call("agent_list", caller)),
        "the agent",
    )
    print(f"taskd server on {url} (logs in {directory}/server.log), agent {agent_uuid} online")
    for task in (
        {"execute": {"cmd": "uname", "args": ["-a"]}},
        {"tcp_ping": f"127.0.0.1:{port}"},
        "version",
    ):
        result = call("task_create_task_blocking", caller, agent_uuid, task, 30000)
        shown = result["task_event_result"] if result["success"] else result["error_message"]
        print(f"  task {result['task_id']} {json.dumps(task)} -> {json.dumps(shown)}")
    print(
        f"try: TASKD_URL={url} TASKD_TOKEN=$(jq -r .caller {directory}/demo-tokens.json) "
        f'taskd call task_create_task_blocking \'["{agent_uuid}", "ip", 5000]\''
    )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running (the last first); kill one that will not end."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _all_kinds() -> tuple[str, ...]:
    from taskd.protocol import TASK_TYPES

    return TASK_TYPES


# --------------------------------------------------------------------------- call


def _token_param(method: str) -> str | None:
    """The name of the param that carries the caller's token, if ``method`` takes one."""
    import inspect

    import taskd.methods  # noqa: F401
    from taskd.rpc import REGISTRY

    info = REGISTRY.get(method)
    if info is None:
        return None
    names = list(inspect.signature(info.fn).parameters)[1:2]  # after the call context
    return names[0] if names and names[0] in ("token", "father_token") else None


def cmd_call(args: argparse.Namespace) -> int:
    """One JSON-RPC call; print the result, or the error and exit 1."""
    try:
        params = json.loads(args.params) if args.params else []
    except json.JSONDecodeError as exc:
        print(f"PARAMS_JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, list | dict):
        print("PARAMS_JSON must be a JSON array or object", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("TASKD_TOKEN")
    name = _token_param(args.method)
    if name is not None and token:
        params = {name: token, **params} if isinstance(params, dict) else [token, *params]
    elif name is not None and not (isinstance(params, dict) and name in params):
        print(
            f"{args.method} needs a token: pass --token KEY:SECRET or set TASKD_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        result = _post_rpc(_server_url(args), args.method, params, args.timeout)
    except _CallFailed as exc:
        print(json.dumps(exc.error) if exc.error is not None else exc.message, file=sys.stderr)
        return exc.code
    print(json.dumps(result, indent=2))
    return 0


def _server_url(args: argparse.Namespace) -> str:
    url = args.url or os.environ.get("TASKD_URL") or DEFAULT_URL
    return str(url).replace("ws://", "http://", 1).replace("wss://", "https://", 1)


# --------------------------------------------------------------------------- cron


class _CallFailed(Exception):
    """A server call failed; the message is printed and ``code`` is the exit status."""

    def __init__(self, message: str, code: int, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.error = error


def _rpc(
    args: argparse.Namespace, method: str, params: dict[str, Any], *, as_param: str = "token"
) -> Any:
    """One JSON-RPC call with the token (as the param ``as_param``); the result, or _CallFailed."""
    token = args.token or os.environ.get("TASKD_TOKEN")
    if not token:
        raise _CallFailed("no token: pass --token or set TASKD_TOKEN", 2)
    return _post_rpc(_server_url(args), method, {as_param: token, **params}, args.timeout)


def _json_arg(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _CallFailed(f"{flag} is not valid JSON: {exc}", 2) from None


def _agents_arg(text: str) -> list[str]:
    agents = [part.strip() for part in text.split(",") if part.strip()]
    if not agents:
        raise _CallFailed("--agents needs at least one agent UUID", 2)
    return agents


def _ms_time(value: int | None) -> str:
    import datetime

    if value is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(value / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _emit(args: argparse.Namespace, result: Any, text: str) -> int:
    print(json.dumps(result) if args.json else text)
    return 0


def cmd_cron_create(args: argparse.Namespace) -> int:
    """Create a cron running one task on several agents."""
    params: dict[str, Any] = {
        "name": args.name,
        "cron_expression": args.expr,
        "cron_type": {
            "agent": [_agents_arg(args.agents), {"task": _json_arg(args.task, "--task")}]
        },
    }
    if args.queue_ttl_ms is not None:
        params["queue_ttl_ms"] = args.queue_ttl_ms
    result = _rpc(args, "crontab_create", params)
    return _emit(args, result, f"created cron {args.name} (id {result['id']})")


def cmd_cron_list(args: argparse.Namespace) -> int:
    """Show every cron the token may read."""
    crons = _rpc(args, "crontab_get", {})
    if args.json:
        return _emit(args, crons, "")
    rows = []
    for cron in crons:
        uuids, task = cron["cron_type"]["agent"]
        agents = uuids[0] + (f" +{len(uuids) - 1}" if len(uuids) > 1 else "")
        rows.append(
            [
                str(cron["id"]),
                cron["name"],
                "yes" if cron["enable"] else "no",
                cron["cron_expression"],
                json.dumps(task["task"], separators=(",", ":")),
                agents,
                _ms_time(cron["last_run_time"]),
            ]
        )
    _print_table(["ID", "NAME", "ENABLED", "EXPRESSION", "TASK", "AGENTS", "LAST RUN"], rows)
    return 0


def cmd_cron_edit(args: argparse.Namespace) -> int:
    """Change a cron's expression, agents, task or queue TTL; unspecified parts stay."""
    crons = _rpc(args, "crontab_get", {})
    current = next((c for c in crons if c["name"] == args.name), None)
    if current is None:
        raise _CallFailed(f"error {ErrorCode.NOT_FOUND}: No cron named {args.name!r}", 1)
    uuids, task = current["cron_type"]["agent"]
    ttl = current.get("queue_ttl_ms") if args.queue_ttl_ms is None else args.queue_ttl_ms
    params: dict[str, Any] = {
        "name": args.name,
        "cron_expression": args.expr or current["cron_expression"],
        "cron_type": {
            "agent": [
                _agents_arg(args.agents) if args.agents else uuids,
                {"task": _json_arg(args.task, "--task") if args.task else task["task"]},
            ]
        },
    }
    if ttl:
        params["queue_ttl_ms"] = ttl
    result = _rpc(args, "crontab_edit", params)
    return _emit(args, result, f"edited cron {args.name}")


def cmd_cron_enable(args: argparse.Namespace) -> int:
    """Enable or disable a cron."""
    result = _rpc(args, "crontab_set_enable", {"name": args.name, "enable": args.enable})
    return _emit(args, result, f"{'enabled' if args.enable else 'disabled'} cron {args.name}")


def cmd_cron_delete(args: argparse.Namespace) -> int:
    """Delete a cron (its results stay)."""
    result = _rpc(args, "crontab_delete", {"name": args.name})
    return _emit(args, result, f"deleted cron {args.name}")


def cmd_cron_results(args: argparse.Namespace) -> int:
    """Show a cron's latest results."""
    conditions = [{"cron_name": args.name}, {"limit": args.limit}]
    rows = _rpc(args, "crontab-result_query", {"query": {"condition": conditions}})
    if args.json:
        return _emit(args, rows, "")
    _print_table(
        ["RUN TIME", "OK", "TASK", "MESSAGE"],
        [
            [
                _ms_time(row["run_time"]),
                "yes" if row["success"] else "no",
                str(row["relative_id"]) if row["relative_id"] is not None else "-",
                row["message"],
            ]
            for row in rows
        ],
    )
    return 0


def cmd_cron_preview(args: argparse.Namespace) -> int:
    """Print the next fire times of an expression (computed locally, like the server does)."""
    import datetime

    from taskd.crontab import parse_expression

    schedule = parse_expression(args.expr, args.timezone)
    times = schedule.next_times(datetime.datetime.now(datetime.UTC), args.count)
    return _emit(args, [t.isoformat() for t in times], "\n".join(t.isoformat() for t in times))


def _client_command(prefix: str, handler: Any) -> Any:
    """``handler`` as a command: a failed call prints ``prefix: message`` and sets the status."""

    def run(args: argparse.Namespace) -> int:
        try:
            code: int = handler(args)
        except _CallFailed as exc:
            print(f"{prefix}: {exc.message}", file=sys.stderr)
            return exc.code
        return code

    return run


def _client_options() -> argparse.ArgumentParser:
    """The options of every command that calls a server."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help=f"server URL (default $TASKD_URL or {DEFAULT_URL})")
    client.add_argument("--token", help="token (default $TASKD_TOKEN)")
    client.add_argument("--timeout", type=float, default=30.0)
    client.add_argument("--json", action="store_true", help="print JSON for scripts")
    return client


def _cron_command(handler: Any) -> Any:
    return _client_command("taskd cron", handler)


def _add_cron_commands(sub: Any) -> None:
    """The ``taskd cron`` command family."""
    client = _client_options()
    cron = sub.add_parser("cron", help="recurring tasks on agents")
    commands = cron.add_subparsers(dest="cron_command", required=True)

    create = commands.add_parser("create", parents=[client], help="create a cron")
    create.add_argument("name")
    create.add_argument("expr", help="sec min hour dom month dow [year], 5 fields, or @hourly ...")
    create.add_argument("--agents", required=True, help="target agent UUIDs, comma-separated")
    create.add_argument(
        "--task", required=True, help='the task as JSON, e.g. \'{"ping":"1.1.1.1"}\''
    )
    create.add_argument("--queue-ttl-ms", type=int, help="queue tasks for offline agents this long")
    create.set_defaults(func=_cron_command(cmd_cron_create))

    listing = commands.add_parser("list", parents=[client], help="list crons")
    listing.set_defaults(func=_cron_command(cmd_cron_list))

    edit = commands.add_parser("edit", parents=[client], help="change a cron")
    edit.add_argument("name")
    edit.add_argument("--expr")
    edit.add_argument("--agents")
    edit.add_argument("--task")
    edit.add_argument("--queue-ttl-ms", type=int, help="0 stops queueing")
    edit.set_defaults(func=_cron_command(cmd_cron_edit))

    for verb, enable in (("enable", True), ("disable", False)):
        toggle = commands.add_parser(verb, parents=[client], help=f"{verb} a cron")
        toggle.add_argument("name")
        toggle.set_defaults(func=_cron_command(cmd_cron_enable), enable=enable)

    remove = commands.add_parser("delete", parents=[client], help="delete a cron")
    remove.add_argument("name")
    remove.set_defaults(func=_cron_command(cmd_cron_delete))

    results = commands.add_parser("results", parents=[client], help="show a cron's fires")
    results.add_argument("name")
    results.add_argument("--limit", type=int, default=20)
    results.set_defaults(func=_cron_command(cmd_cron_results))

    preview = commands.add_parser("preview", help="show an expression's next fire times")
    preview.add_argument("expr")
    preview.add_argument("--count", type=int, default=5)
    preview.add_argument("--timezone", default="UTC")
    preview.add_argument("--json", action="store_true", help="print JSON for scripts")
    preview.set_defaults(func=_cron_command(cmd_cron_preview))


# --------------------------------------------------------------------------- token


def _token_limits(args: argparse.Namespace) -> Any:
    """The limits asked for: a role preset (taskd.roles) or --limits JSON."""
    from taskd.roles import role_limits

    if (args.role is None) == (args.limits is None):
        raise _CallFailed("give either --role or --limits", 2)
    if args.limits is not None:
        return _json_arg(args.limits, "--limits")
    agents = ([args.agent] if args.agent else []) + (
        _agents_arg(args.agents) if args.agents else []
    )
    types = [part.strip() for part in (args.types or "*").split(",") if part.strip()]
    try:
        return role_limits(args.role, agents=agents, types=types)
    except TaskdError as exc:
        raise _CallFailed(exc.message, 2) from None


def _issued(result: dict[str, Any]) -> dict[str, Any]:
    """A create or roll reply with the ready KEY:SECRET string added."""
    return {**result, "token": f"{result['key']}:{result['secret']}"}


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create a token from a role preset or explicit limits; its secret is shown once."""
    creation: dict[str, Any] = {"token_limit": _token_limits(args)}
    for name, value in (
        ("description", args.description),
        ("timestamp_from", args.valid_from),
        ("timestamp_to", args.valid_to),
        ("max_uses", args.max_uses),
    ):
        if value is not None:
            creation[name] = value
    if args.username is not None:
        if not args.password_stdin:
            raise _CallFailed("--username needs --password-stdin", 2)
        creation["username"] = args.username
        creation["password"] = sys.stdin.readline().rstrip("\n")
    params = {"token_creation": creation}
    result = _issued(_rpc(args, "token_create", params, as_param="father_token"))
    return _emit(
        args,
        result,
        f"created token {result['key']} (shown once, keep it safe):\n{result['token']}",
    )


def cmd_token_list(args: argparse.Namespace) -> int:
    """Show every token: key, role, validity window, uses, description (never a secret)."""
    from taskd.roles import describe_limits

    tokens = _rpc(args, "token_list_all_tokens", {})["tokens"]
    if args.json:
        return _emit(args, tokens, "")
    rows = [
        [
            t["token_key"],
            describe_limits(t["token_limit"], t["is_super"]),
            t["username"] or "-",
            _ms_time(t["timestamp_from"]),
            _ms_time(t["timestamp_to"]),
            str(t["uses"]) + (f"/{t['max_uses']}" if t["max_uses"] is not None else ""),
            t["description"] or "",
        ]
        for t in tokens
    ]
    _print_table(["KEY", "ROLE", "USER", "VALID FROM", "VALID TO", "USES", "DESCRIPTION"], rows)
    return 0


def cmd_token_delete(args: argparse.Namespace) -> int:
    """Revoke a token at once."""
    result = _rpc(args, "token_delete", {"target_token": args.key})
    return _emit(args, result, f"deleted token {args.key}")


def cmd_token_roll(args: argparse.Namespace) -> int:
    """Give a token a new secret; the old one stops working at once."""
    result = _issued(_rpc(args, "token_roll_token_secret", {"target_token": args.key}))
    return _emit(args, result, f"new secret for token {args.key} (shown once):\n{result['token']}")


def _add_token_commands(sub: Any) -> None:
    """The ``taskd token`` command family."""
    client = _client_options()
    token = sub.add_parser("token", help="create, list, roll and revoke tokens")
    commands = token.add_subparsers(dest="token_command", required=True)

    create = commands.add_parser(
        "create",
        parents=[client],
        help="create a token",
        description="Create a token from a role preset (agent, caller, readonly, enroll; "
        "see the README for the limits each produces) or from --limits JSON.",
    )
    create.add_argument("--role", help="agent | caller | readonly | enroll")
    create.add_argument("--agent", help="agent role: the agent's UUID")
    create.add_argument("--agents", help="caller role: agent UUIDs, comma-separated")
    create.add_argument(
        "--types", help="caller role: task type patterns (default *), e.g. ping,tcp*"
    )
    create.add_argument("--limits", help="explicit limits as JSON instead of a role")
    create.add_argument("--description")
    create.add_argument("--valid-from", type=int, help="valid from (ms since the epoch)")
    create.add_argument("--valid-to", type=int, help="valid until (ms since the epoch)")
    create.add_argument("--max-uses", type=int, help="enrollments it may make (enroll tokens)")
    create.add_argument("--username", help="also log in as USERNAME|PASSWORD")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    create.set_defaults(func=_client_command("taskd token", cmd_token_create))

    listing = commands.add_parser("list", parents=[client], help="list tokens")
    listing.set_defaults(func=_client_command("taskd token", cmd_token_list))

    for verb, handler, what in (
        ("delete", cmd_token_delete, "revoke a token"),
        ("roll", cmd_token_roll, "give a token a new secret"),
    ):
        command = commands.add_parser(verb, parents=[client], help=what)
        command.add_argument("key", help="the token's key or username")
        command.set_defaults(func=_client_command("taskd token", handler))


# --------------------------------------------------------------------------- agent enroll


def _server_urls(server: str) -> tuple[str, str]:
    """The HTTP form (for calls) and the WebSocket form (for the agent) of a server URL."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server if "://" in server else f"http://{server}")
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise _CallFailed(f"--server {server!r} is not an http(s):// or ws(s):// URL", 2)
    secure = parts.scheme in ("https", "wss")
    rest = (parts.netloc, parts.path or "/", parts.query, "")
    return urlunsplit(("https" if secure else "http", *rest)), urlunsplit(
        ("wss" if secure else "ws", *rest)
    )


def _post_rpc(url: str, method: str, params: Any, timeout: float = 30.0) -> Any:
    """One JSON-RPC call over HTTP; the result, or _CallFailed (exit 1 error, 3 unreachable)."""
    import httpx

    request = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    try:
        body = httpx.post(url, json=request, timeout=timeout).json()
    except httpx.HTTPError as exc:
        raise _CallFailed(f"cannot reach {url}: {exc}", 3) from None
    except ValueError:
        raise _CallFailed(f"{url} did not answer with JSON", 3) from None
    if not isinstance(body, dict):
        raise _CallFailed(f"unexpected reply from {url}", 3)
    if "error" in body:
        error = body["error"]
        raise _CallFailed(f"error {error.get('code')}: {error.get('message')}", 1, error)
    return body.get("result")


def cmd_agent_enroll(args: argparse.Namespace) -> int:
    """Enroll this machine with a server and write a ready agent config (mode 0600)."""
    from urllib.parse import urlsplit

    import tomlkit

    from taskd.config import parse_agent_config, write_private_file

    token = args.enroll_token or os.environ.get("TASKD_ENROLL_TOKEN")
    if not args.server or not token:
        raise _CallFailed("needs --server URL and --enroll-token KEY:SECRET", 2)
    path = Path(args.config or os.environ.get("TASKD_AGENT_CONFIG") or "agent.toml")
    if path.exists() and not args.force:
        raise _CallFailed(f"{path} already exists; pass --force to replace it", 2)
    http_url, ws_url = _server_urls(args.server)
    server_uuid = _post_rpc(http_url, "server_uuid", [])
    enrolled = _post_rpc(
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


def _run_agent(args: argparse.Namespace) -> int:
    if args.action == "enroll":
        code: int = _client_command("taskd agent enroll", cmd_agent_enroll)(args)
        return code
    return cmd_agent(args)


def _add_agent_enroll(agent: argparse.ArgumentParser) -> None:
    """``taskd agent enroll --server URL --enroll-token T [--config F] [--uuid U] [--force]``."""
    agent.add_argument(
        "action", nargs="?", choices=["enroll"], help="enroll: register with a server, write config"
    )
    agent.add_argument("--enroll-token", help="enroll: a token with the enroll role")
    agent.add_argument("--force", action="store_true", help="enroll: replace an existing config")
    agent.set_defaults(func=_run_agent)


# --------------------------------------------------------------------------- schemas


def cmd_schemas(args: argparse.Namespace) -> int:
    """Write (or with --check, verify) the JSON Schemas and openrpc.json."""
    import taskd.methods  # noqa: F401 - registers every method the document describes
    from taskd import schemas

    directory = Path(args.dir)
    if args.check:
        stale = schemas.stale(directory)
        if stale:
            print(
                f"stale schema files in {directory}: {', '.join(stale)}; run `taskd schemas`",
                file=sys.stderr,
            )
            return 1
        print(f"{directory} is up to date")
        return 0
    changed = schemas.write(directory)
    print(
        f"wrote {len(changed)} file(s) to {directory}"
        + (f": {', '.join(changed)}" if changed else "")
    )
    return 0


# --------------------------------------------------------------------------- parser


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
    _add_agent_enroll(agent)

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

    _add_cron_commands(sub)
    _add_token_commands(sub)

    schemas = sub.add_parser("schemas", help="write the JSON Schemas and openrpc.json")
    schemas.add_argument("--dir", default="schemas")
    schemas.add_argument("--check", action="store_true", help="fail if the files are stale")
    schemas.set_defaults(func=cmd_schemas)
    return parser


LONG_RUNNING = (cmd_serve, cmd_agent, _run_agent, cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
