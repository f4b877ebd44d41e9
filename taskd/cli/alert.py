"""``taskd alert``: channels (add, list, test, delete), rules (add, list, delete), events."""

from __future__ import annotations

import argparse
from typing import Any

from taskd.cli.client import (
    CallFailed,
    client_command,
    client_options,
    emit,
    json_arg,
    ms_time,
    print_table,
    rpc,
)

KINDS = ("agent_offline", "probe_failed", "probe_latency", "metric")


def cmd_channel_add(args: argparse.Namespace) -> int:
    """Create a channel from an Apprise URL."""
    result = rpc(args, "alert_channel_create", {"name": args.name, "url": args.apprise_url})
    return emit(args, result, f"created alert channel {args.name} (id {result['id']})")


def cmd_channel_list(args: argparse.Namespace) -> int:
    """Show every channel, its URL redacted."""
    channels = rpc(args, "alert_channel_list", {})
    if args.json:
        return emit(args, channels, "")
    print_table(
        ["ID", "NAME", "SCHEME", "URL"],
        [[str(c["id"]), c["name"], c["scheme"], c["url_redacted"]] for c in channels],
    )
    return 0


def cmd_channel_test(args: argparse.Namespace) -> int:
    """Send a test message to a channel."""
    result = rpc(args, "alert_channel_test", {"name": args.name})
    return emit(args, result, f"test message sent to alert channel {args.name}")


def cmd_channel_delete(args: argparse.Namespace) -> int:
    """Delete a channel."""
    result = rpc(args, "alert_channel_delete", {"name": args.name})
    return emit(args, result, f"deleted alert channel {args.name}")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """A rule's params from the flags of its kind."""
    if args.params is not None:
        given = json_arg(args.params, "--params")
        if not isinstance(given, dict):
            raise CallFailed("--params must be a JSON object", 2)
        return given
    if args.kind == "agent_offline":
        return {"grace_ms": args.grace_ms}
    if args.kind in ("probe_failed", "probe_latency"):
        if not args.cron:
            raise CallFailed(f"a {args.kind} rule needs --cron", 2)
        params: dict[str, Any] = {"cron": args.cron, "consecutive": args.consecutive}
        if args.kind == "probe_latency":
            if args.above is None:
                raise CallFailed("a probe_latency rule needs --above (ms)", 2)
            params["above_ms"] = args.above
        return params
    if not args.field or (args.above is None) == (args.below is None):
        raise CallFailed("a metric rule needs --field and one of --above, --below", 2)
    threshold = {"above": args.above} if args.above is not None else {"below": args.below}
    return {"field": args.field, **threshold, "for_ms": args.for_ms}


def cmd_rule_add(args: argparse.Namespace) -> int:
    """Create a rule."""
    targets: Any = "all"
    if args.agents != "all":
        targets = [part.strip() for part in args.agents.split(",") if part.strip()]
    rule: dict[str, Any] = {
        "name": args.name,
        "kind": args.kind,
        "targets": targets,
        "params": _params(args),
        "channels": [c.strip() for c in (args.channels or "").split(",") if c.strip()],
        "enable": not args.disabled,
    }
    if args.remind_ms is not None:
        rule["remind_ms"] = args.remind_ms
    result = rpc(args, "alert_rule_create", {"rule": rule})
    return emit(args, result, f"created alert rule {args.name} (id {result['id']})")


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items())


def cmd_rule_list(args: argparse.Namespace) -> int:
    """Show every rule."""
    rules = rpc(args, "alert_rule_list", {})
    if args.json:
        return emit(args, rules, "")
    rows = []
    for rule in rules:
        targets = rule["targets"]
        if targets != "all":
            targets = targets[0] + (f" +{len(targets) - 1}" if len(targets) > 1 else "")
        rows.append(
            [
                str(rule["id"]),
                rule["name"],
                rule["kind"],
                "yes" if rule["enable"] else "no",
                _describe(rule["params"]),
                targets,
                ",".join(rule["channels"]) or "-",
            ]
        )
    print_table(["ID", "NAME", "KIND", "ENABLED", "PARAMS", "TARGETS", "CHANNELS"], rows)
    return 0


def cmd_rule_delete(args: argparse.Namespace) -> int:
    """Delete a rule."""
    result = rpc(args, "alert_rule_delete", {"name": args.name})
    return emit(args, result, f"deleted alert rule {args.name}")


def cmd_events(args: argparse.Namespace) -> int:
    """Show the newest events."""
    conditions: list[Any] = [{"limit": args.limit}]
    if args.rule:
        conditions.append({"rule": args.rule})
    if args.agent:
        conditions.append({"uuid": args.agent})
    if args.firing:
        conditions.append("is_firing")
    events = rpc(args, "alert_event_query", {"query": {"condition": conditions}})
    if args.json:
        return emit(args, events, "")
    rows = []
    for event in events:
        failed = [d for d in event.get("deliveries", []) if d["state"] != "sent"]
        rows.append(
            [
                str(event["id"]),
                event["state"],
                event["rule"],
                event["uuid"],
                ms_time(event["started_at"]),
                ms_time(event["resolved_at"]),
                f"{len(failed)} unsent" if failed else "sent",
                event["message"],
            ]
        )
    print_table(
        ["ID", "STATE", "RULE", "AGENT", "STARTED", "RESOLVED", "NOTIFIED", "MESSAGE"], rows
    )
    return 0


def _alert_command(handler: Any) -> Any:
    return client_command("taskd alert", handler)


def add_alert_commands(sub: Any) -> None:
    """The ``taskd alert`` command family."""
    client = client_options()
    alert = sub.add_parser("alert", help="alert channels, rules and events")
    families = alert.add_subparsers(dest="alert_command", required=True)

    channel = families.add_parser("channel", help="where notifications go (Apprise URLs)")
    channels = channel.add_subparsers(dest="channel_command", required=True)
    add = channels.add_parser("add", parents=[client], help="create a channel")
    add.add_argument("name")
    add.add_argument(
        "apprise_url",
        metavar="URL",
        help="an Apprise URL: json://host/path, mailto://..., tgram://...",
    )
    add.set_defaults(func=_alert_command(cmd_channel_add))
    listing = channels.add_parser("list", parents=[client], help="list channels (redacted)")
    listing.set_defaults(func=_alert_command(cmd_channel_list))
    test = channels.add_parser("test", parents=[client], help="send a test message")
    test.add_argument("name")
    test.set_defaults(func=_alert_command(cmd_channel_test))
    delete = channels.add_parser("delete", parents=[client], help="delete a channel")
    delete.add_argument("name")
    delete.set_defaults(func=_alert_command(cmd_channel_delete))

    rule = families.add_parser("rule", help="conditions watched on agents")
    rules = rule.add_subparsers(dest="rule_command", required=True)
    add = rules.add_parser("add", parents=[client], help="create a rule")
    add.add_argument("name")
    add.add_argument("kind", choices=KINDS)
    add.add_argument("--agents", default="all", help='agent UUIDs, comma-separated, or "all"')
    add.add_argument("--channels", help="channel names, comma-separated")
    add.add_argument("--grace-ms", type=int, default=60_000, help="agent_offline (default 60 s)")
    add.add_argument("--cron", help="probe_failed / probe_latency: the cron whose tasks count")
    add.add_argument("--consecutive", type=int, default=3, help="probes in a row (default 3)")
    add.add_argument("--field", help="metric: a summary field, e.g. cpu_usage")
    add.add_argument("--above", type=float, help="metric threshold, or probe_latency ms")
    add.add_argument("--below", type=float, help="metric threshold")
    add.add_argument("--for-ms", type=int, default=0, help="metric: how long it must hold")
    add.add_argument("--params", help="the params as a JSON object (instead of the flags)")
    add.add_argument("--remind-ms", type=int, help="remind this often while firing")
    add.add_argument("--disabled", action="store_true", help="create it disabled")
    add.set_defaults(func=_alert_command(cmd_rule_add))
    listing = rules.add_parser("list", parents=[client], help="list rules")
    listing.set_defaults(func=_alert_command(cmd_rule_list))
    delete = rules.add_parser("delete", parents=[client], help="delete a rule")
    delete.add_argument("name")
    delete.set_defaults(func=_alert_command(cmd_rule_delete))

    events = families.add_parser("events", parents=[client], help="show the newest events")
    events.add_argument("--rule")
    events.add_argument("--agent")
    events.add_argument("--firing", action="store_true", help="only events still firing")
    events.add_argument("--limit", type=int, default=20)
    events.set_defaults(func=_alert_command(cmd_events))
