"""``taskd cron``: create, list, edit, enable, delete, results, preview."""

from __future__ import annotations

import argparse
import json
from typing import Any

from taskd.cli.client import (
    CallFailed,
    agents_arg,
    client_command,
    client_options,
    emit,
    json_arg,
    ms_time,
    print_table,
    rpc,
)
from taskd.errors import ErrorCode


def cmd_cron_create(args: argparse.Namespace) -> int:
    """Create a cron running one task on several agents."""
    params: dict[str, Any] = {
        "name": args.name,
        "cron_expression": args.expr,
        "cron_type": {"agent": [agents_arg(args.agents), {"task": json_arg(args.task, "--task")}]},
    }
    if args.queue_ttl_ms is not None:
        params["queue_ttl_ms"] = args.queue_ttl_ms
    if args.retention_ms is not None:
        params["result_retention_ms"] = args.retention_ms
    result = rpc(args, "crontab_create", params)
    return emit(args, result, f"created cron {args.name} (id {result['id']})")


def cmd_cron_list(args: argparse.Namespace) -> int:
    """Show every cron the token may read."""
    crons = rpc(args, "crontab_get", {})
    if args.json:
        return emit(args, crons, "")
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
                ms_time(cron["last_run_time"]),
            ]
        )
    print_table(["ID", "NAME", "ENABLED", "EXPRESSION", "TASK", "AGENTS", "LAST RUN"], rows)
    return 0


def cmd_cron_edit(args: argparse.Namespace) -> int:
    """Change a cron's expression, agents, task, queue TTL or retention; unspecified parts stay."""
    crons = rpc(args, "crontab_get", {})
    current = next((c for c in crons if c["name"] == args.name), None)
    if current is None:
        raise CallFailed(f"error {ErrorCode.NOT_FOUND}: No cron named {args.name!r}", 1)
    uuids, task = current["cron_type"]["agent"]
    ttl = current.get("queue_ttl_ms") if args.queue_ttl_ms is None else args.queue_ttl_ms
    params: dict[str, Any] = {
        "name": args.name,
        "cron_expression": args.expr or current["cron_expression"],
        "cron_type": {
            "agent": [
                agents_arg(args.agents) if args.agents else uuids,
                {"task": json_arg(args.task, "--task") if args.task else task["task"]},
            ]
        },
    }
    if ttl:
        params["queue_ttl_ms"] = ttl
    if args.retention_ms is not None:  # else the server keeps the cron's retention
        params["result_retention_ms"] = args.retention_ms
    result = rpc(args, "crontab_edit", params)
    return emit(args, result, f"edited cron {args.name}")


def cmd_cron_enable(args: argparse.Namespace) -> int:
    """Enable or disable a cron."""
    result = rpc(args, "crontab_set_enable", {"name": args.name, "enable": args.enable})
    return emit(args, result, f"{'enabled' if args.enable else 'disabled'} cron {args.name}")


def cmd_cron_delete(args: argparse.Namespace) -> int:
    """Delete a cron (its results stay)."""
    result = rpc(args, "crontab_delete", {"name": args.name})
    return emit(args, result, f"deleted cron {args.name}")


def cmd_cron_results(args: argparse.Namespace) -> int:
    """Show a cron's latest results."""
    conditions = [{"cron_name": args.name}, {"limit": args.limit}]
    rows = rpc(args, "crontab-result_query", {"query": {"condition": conditions}})
    if args.json:
        return emit(args, rows, "")
    print_table(
        ["RUN TIME", "OK", "TASK", "MESSAGE"],
        [
            [
                ms_time(row["run_time"]),
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
    return emit(args, [t.isoformat() for t in times], "\n".join(t.isoformat() for t in times))


def _cron_command(handler: Any) -> Any:
    return client_command("taskd cron", handler)


def add_cron_commands(sub: Any) -> None:
    """The ``taskd cron`` command family."""
    client = client_options()
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
    create.add_argument(
        "--retention-ms",
        type=int,
        help="keep this cron's results this long (default: the server's)",
    )
    create.set_defaults(func=_cron_command(cmd_cron_create))

    listing = commands.add_parser("list", parents=[client], help="list crons")
    listing.set_defaults(func=_cron_command(cmd_cron_list))

    edit = commands.add_parser("edit", parents=[client], help="change a cron")
    edit.add_argument("name")
    edit.add_argument("--expr")
    edit.add_argument("--agents")
    edit.add_argument("--task")
    edit.add_argument("--queue-ttl-ms", type=int, help="0 stops queueing")
    edit.add_argument(
        "--retention-ms", type=int, help="keep results this long; 0: the server's default"
    )
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
