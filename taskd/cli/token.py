"""``taskd token``: create, list, roll and revoke tokens."""

from __future__ import annotations

import argparse
import sys
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
from taskd.errors import TaskdError


def _token_limits(args: argparse.Namespace) -> Any:
    """The limits asked for: a role preset (taskd.roles) or --limits JSON."""
    from taskd.roles import role_limits

    if (args.role is None) == (args.limits is None):
        raise CallFailed("give either --role or --limits", 2)
    if args.limits is not None:
        return json_arg(args.limits, "--limits")
    agents = ([args.agent] if args.agent else []) + (agents_arg(args.agents) if args.agents else [])
    types = [part.strip() for part in (args.types or "*").split(",") if part.strip()]
    try:
        return role_limits(args.role, agents=agents, types=types)
    except TaskdError as exc:
        raise CallFailed(exc.message, 2) from None


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
            raise CallFailed("--username needs --password-stdin", 2)
        creation["username"] = args.username
        creation["password"] = sys.stdin.readline().rstrip("\n")
    params = {"token_creation": creation}
    result = _issued(rpc(args, "token_create", params, as_param="father_token"))
    return emit(
        args,
        result,
        f"created token {result['key']} (shown once, keep it safe):\n{result['token']}",
    )


def cmd_token_list(args: argparse.Namespace) -> int:
    """Show every token: key, role, validity window, uses, description (never a secret)."""
    from taskd.roles import describe_limits

    tokens = rpc(args, "token_list_all_tokens", {})["tokens"]
    if args.json:
        return emit(args, tokens, "")
    rows = [
        [
            t["token_key"],
            describe_limits(t["token_limit"], t["is_super"]),
            t["username"] or "-",
            ms_time(t["timestamp_from"]),
            ms_time(t["timestamp_to"]),
            str(t["uses"]) + (f"/{t['max_uses']}" if t["max_uses"] is not None else ""),
            t["description"] or "",
        ]
        for t in tokens
    ]
    print_table(["KEY", "ROLE", "USER", "VALID FROM", "VALID TO", "USES", "DESCRIPTION"], rows)
    return 0


def cmd_token_delete(args: argparse.Namespace) -> int:
    """Revoke a token at once."""
    result = rpc(args, "token_delete", {"target_token": args.key})
    return emit(args, result, f"deleted token {args.key}")


def cmd_token_roll(args: argparse.Namespace) -> int:
    """Give a token a new secret; the old one stops working at once."""
    result = _issued(rpc(args, "token_roll_token_secret", {"target_token": args.key}))
    return emit(args, result, f"new secret for token {args.key} (shown once):\n{result['token']}")


def add_token_commands(sub: Any) -> None:
    """The ``taskd token`` command family."""
    client = client_options()
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
    create.set_defaults(func=client_command("taskd token", cmd_token_create))

    listing = commands.add_parser("list", parents=[client], help="list tokens")
    listing.set_defaults(func=client_command("taskd token", cmd_token_list))

    for verb, handler, what in (
        ("delete", cmd_token_delete, "revoke a token"),
        ("roll", cmd_token_roll, "give a token a new secret"),
    ):
        command = commands.add_parser(verb, parents=[client], help=what)
        command.add_argument("key", help="the token's key or username")
        command.set_defaults(func=client_command("taskd token", handler))
