"""``taskd demo``: a server and a local agent, and one task round trip."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from taskd.cli.server import cmd_init
from taskd.cli.settings import server_settings
from taskd.config import (
    ServerSettings,
)


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
            # the dashboard's demo user: sees everything, runs tasks, edits crons
            "dashboard": [
                {
                    "scopes": ["global"],
                    "permissions": [
                        {"task": {"create": "*"}},
                        {"task": {"read": "*"}},
                        {"agent": "list"},
                        {"crontab": "read"},
                        {"crontab": "write"},
                        {"crontab_result": {"read": "*"}},
                        {"terminal": "connect"},
                        {"dynamic_monitoring_summary": "read"},
                        {"alert": "read"},
                        *({"static_monitoring": {"read": field}} for field in ("cpu", "system")),
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
        dashboard = tokens.get("dashboard", tokens["caller"])
        _demo_round_trip(directory, port, tokens["caller"], agent_uuid, dashboard)
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


def _demo_round_trip(
    directory: Path, port: int, caller: str, agent_uuid: str, dashboard: str
) -> None:
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
    # the credential rides in the fragment: browsers never send it, the page takes it out
    print(f"dashboard: open {url}ui/#login={dashboard}", flush=True)


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
