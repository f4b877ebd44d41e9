"""``taskd agents``: the fleet at a glance, and one agent in detail.

Hostnames, OS names and the like are the agents' own words: before they reach a
terminal every control character (escape sequences included) is shown as its
escape (``\\x1b``), so an agent cannot move the cursor, recolour or rewrite the
screen of whoever lists the fleet. ``--json`` output is JSON-escaped already.
"""

from __future__ import annotations

import argparse
import time
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from taskd.cli.client import (
    CallFailed,
    client_command,
    client_options,
    emit,
    ms_time,
    print_table,
    rpc,
)

DISK_WARN = 0.9
"""A disk fuller than this is marked in the table."""
RECENT_ROWS = 5
"""Newest summaries ``taskd agents show`` prints."""
WINDOWS_MS: dict[str, int] = {"10 min": 600_000, "1 h": 3_600_000}
"""The spans ``taskd agents show`` summarises (min/avg/max of the 1-minute rollups)."""
FIGURES: tuple[tuple[str, str], ...] = (
    ("cpu_usage", "CPU %"),
    ("used_memory", "memory used"),
    ("load_one", "load 1 min"),
    ("receive_speed", "net in /s"),
    ("transmit_speed", "net out /s"),
)
"""Summary figures ``taskd agents show`` charts in words, with their labels."""
SIZES = frozenset({"used_memory", "receive_speed", "transmit_speed"})
"""The FIGURES in bytes (or bytes/s)."""
PERMISSION_DENIED = 102


def clean(value: Any, width: int | None = None) -> str:
    """Text safe for a terminal: control and format characters escaped, cut to ``width``."""
    if value is None:
        return "-"
    text = "".join(
        char
        if unicodedata.category(char)[0] != "C" or char == " "
        else char.encode("unicode_escape").decode("ascii")
        for char in str(value)
    )
    if width is not None and len(text) > width:
        return text[: width - 1] + "…"
    return text


def size(value: Any) -> str:
    """Bytes for people (1024-based): ``512B``, ``3.8G``, ``120G``."""
    if not isinstance(value, int | float):
        return "-"
    amount = float(value)
    for unit in ("B", "K", "M", "G", "T", "P"):
        if amount < 1024 or unit == "P":
            break
        amount /= 1024
    if unit == "B":
        return f"{int(amount)}B"
    return f"{amount:.1f}{unit}" if amount < 10 else f"{amount:.0f}{unit}"


def ago(ms: int | None, now_ms: int) -> str:
    """How long before ``now_ms`` a time was, in the largest whole unit (``5s ago``)."""
    if ms is None:
        return "-"
    seconds = max(now_ms - ms, 0) // 1000
    for unit, length in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit} ago"
    return f"{seconds}s ago"


def duration(seconds: Any) -> str:
    """Seconds as days, hours and minutes (``3d 4h``)."""
    if not isinstance(seconds, int):
        return "-"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {rest // 60}m" if hours else f"{rest // 60}m {rest % 60}s"


def _share(used: Any, total: Any) -> float | None:
    if isinstance(used, int | float) and isinstance(total, int | float) and total > 0:
        return float(used) / float(total)
    return None


def memory(metrics: Mapping[str, Any] | None) -> str:
    """``used/total percent`` of memory."""
    if not metrics or metrics.get("total_memory") is None:
        return "-"
    share = _share(metrics.get("used_memory"), metrics["total_memory"])
    percent = f" {share:.0%}" if share is not None else ""
    return f"{size(metrics.get('used_memory'))}/{size(metrics['total_memory'])}{percent}"


def disk_used(metrics: Mapping[str, Any] | None) -> int | None:
    """Bytes used on the agent's disks (total less available)."""
    if not metrics:
        return None
    total, available = metrics.get("total_space"), metrics.get("available_space")
    if isinstance(total, int) and isinstance(available, int):
        return max(total - available, 0)
    return None


def disk(metrics: Mapping[str, Any] | None) -> tuple[str, bool]:
    """``used/total percent`` of the disks, and whether they are fuller than DISK_WARN."""
    used = disk_used(metrics)
    if not metrics or used is None:
        return "-", False
    share = _share(used, metrics["total_space"])
    full = share is not None and share > DISK_WARN
    percent = f" {share:.0%}" if share is not None else ""
    return f"{size(used)}/{size(metrics['total_space'])}{percent}{' !' if full else ''}", full


def os_name(host: Mapping[str, Any] | None) -> Any:
    """The host's OS in one phrase, as the agent named it."""
    if not host:
        return None
    if host.get("os_long_version"):
        return host["os_long_version"]
    return " ".join(part for part in (host.get("os"), host.get("os_version")) if part) or None


def _matches(agent: Mapping[str, Any], text: str) -> bool:
    host = agent.get("host") or {}
    fields = (
        agent["uuid"],
        agent.get("remote_addr"),
        host.get("hostname"),
        os_name(host),
        host.get("arch"),
    )
    return any(isinstance(field, str) and text in field.casefold() for field in fields)


def chosen(agents: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[Any]:
    """The agents the filters keep: ``--online`` / ``--offline``, ``--search``."""
    kept = list(agents)
    if args.online:
        kept = [agent for agent in kept if agent["online"]]
    if args.offline:
        kept = [agent for agent in kept if not agent["online"]]
    if args.search:
        text = args.search.casefold()
        kept = [agent for agent in kept if _matches(agent, text)]
    return kept


def cmd_agents(args: argparse.Namespace) -> int:
    """The fleet as a table: each agent's host, online state, CPU, memory, disk, last seen."""
    if args.online and args.offline:
        raise CallFailed("give --online or --offline, not both", 2)
    agents = chosen(rpc(args, "agent_list", {}), args)
    if args.json:
        return emit(args, agents, "")
    now = time.time_ns() // 1_000_000
    rows, full = [], 0
    for agent in agents:
        host, metrics = agent.get("host"), agent.get("metrics")
        cpu = metrics.get("cpu_usage") if metrics else None
        disk_text, disk_full = disk(metrics)
        full += disk_full
        rows.append(
            [
                agent["uuid"][:8],
                clean(host.get("hostname") if host else None, 32),
                "yes" if agent["online"] else "OFFLINE",
                clean(os_name(host), 32),
                f"{cpu:.1f}" if isinstance(cpu, int | float) else "-",
                memory(metrics),
                disk_text,
                ago(agent["last_seen"], now),
            ]
        )
    print_table(["UUID", "HOSTNAME", "ONLINE", "OS", "CPU%", "MEM", "DISK", "LAST SEEN"], rows)
    online = sum(1 for agent in agents if agent["online"])
    footer = f"{len(agents)} agent(s), {online} online, {len(agents) - online} offline"
    if full:
        footer += f"; {full} with disks over {DISK_WARN:.0%} full (!)"
    print(footer)
    return 0


def _find(agents: Sequence[Mapping[str, Any]], wanted: str) -> Mapping[str, Any]:
    """The agent whose UUID is ``wanted`` or starts with it; CallFailed if none or several."""
    key = wanted.strip().lower()
    exact = [agent for agent in agents if agent["uuid"] == key]
    found = exact or [agent for agent in agents if key and agent["uuid"].startswith(key)]
    if not found:
        raise CallFailed(f"no agent {clean(wanted)} (or the token may not list it)", 1)
    if len(found) > 1:
        raise CallFailed(
            f"{clean(wanted)} matches {len(found)} agents: "
            + ", ".join(agent["uuid"] for agent in found[:5]),
            1,
        )
    return found[0]


def _summaries(args: argparse.Namespace, agent_uuid: str, query: dict[str, Any]) -> Any:
    """A summary query on one agent, or None if the token may not read summaries."""
    query["condition"] = [{"uuid": agent_uuid}, *query.get("condition", [])]
    try:
        return rpc(args, "agent_query_dynamic_summary", {"dynamic_summary_query": query})
    except CallFailed as exc:
        if exc.error is not None and exc.error.get("code") == PERMISSION_DENIED:
            return None
        raise


def _span(buckets: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any] | None:
    """min / avg / max of one figure over 1-minute rollup buckets (avg: of the buckets)."""
    averages = [b[name] for b in buckets if b.get(name) is not None]
    if not averages:
        return None
    return {
        "min": min(b[f"{name}_min"] for b in buckets if b.get(f"{name}_min") is not None),
        "avg": sum(averages) / len(averages),
        "max": max(b[f"{name}_max"] for b in buckets if b.get(f"{name}_max") is not None),
    }


def recent(args: argparse.Namespace, agent_uuid: str) -> dict[str, Any] | None:
    """The newest summaries and min/avg/max per WINDOWS_MS span; None if not readable."""
    fields = [name for name, _ in FIGURES]
    rows = _summaries(args, agent_uuid, {"fields": fields, "condition": [{"limit": RECENT_ROWS}]})
    if rows is None:
        return None
    now = time.time_ns() // 1_000_000
    longest = max(WINDOWS_MS.values())
    buckets = _summaries(
        args,
        agent_uuid,
        {"fields": fields, "condition": [{"timestamp_from": now - longest}], "resolution": "1m"},
    )
    spans = {}
    for label, span_ms in WINDOWS_MS.items():
        inside = [b for b in buckets or [] if b["timestamp"] >= now - span_ms - 60_000]
        spans[label] = {name: _span(inside, name) for name in fields}
    return {"rows": rows, "windows": spans}


def _figure(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in SIZES:
        return size(round(value))
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _details(agent: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The agent's facts as (label, text) lines."""
    host, metrics = agent.get("host") or {}, agent.get("metrics") or {}
    now = time.time_ns() // 1_000_000
    if agent["online"]:
        state = f"yes, since {ms_time(agent['connected_since'])} on node {agent['node_id']}"
    else:
        state = "OFFLINE"
    cores = host.get("cpu_cores")
    physical = host.get("cpu_physical_cores")
    cpu = clean(host.get("cpu_brand")) if host.get("cpu_brand") else "-"
    if cores is not None:
        cpu += f" ({cores} cores" + (f", {physical} physical)" if physical else ")")
    disk_text, _ = disk(metrics)
    loads = [metrics.get(f"load_{n}") for n in ("one", "five", "fifteen")]
    incoming, outgoing = metrics.get("receive_speed"), metrics.get("transmit_speed")
    return [
        ("uuid", agent["uuid"]),
        ("online", state),
        ("last seen", f"{ms_time(agent['last_seen'])} ({ago(agent['last_seen'], now)})"),
        ("first seen", ms_time(agent["first_seen"])),
        ("address", clean(agent.get("remote_addr"))),
        ("hostname", clean(host.get("hostname"))),
        ("os", clean(os_name(host))),
        ("kernel", clean(host.get("kernel"))),
        ("arch", clean(host.get("arch"))),
        ("virtualization", clean(host.get("virtualization"))),
        ("cpu", cpu),
        ("host facts at", ms_time(host.get("time"))),
        ("cpu usage", _figure("cpu_usage", metrics.get("cpu_usage")) + " %"),
        ("memory", memory(metrics)),
        ("swap", f"{size(metrics.get('used_swap'))}/{size(metrics.get('total_swap'))}"),
        ("disk", disk_text),
        ("load", " ".join("-" if v is None else f"{v:.2f}" for v in loads)),
        ("network", f"in {size(incoming)}/s, out {size(outgoing)}/s"),
        ("uptime", duration(metrics.get("uptime"))),
        ("metrics at", ms_time(metrics.get("time"))),
    ]


def cmd_agents_show(args: argparse.Namespace) -> int:
    """One agent's host facts, online state, last seen, and its recent metrics."""
    agent = _find(rpc(args, "agent_list", {}), args.uuid)
    history = recent(args, agent["uuid"])
    if args.json:
        return emit(args, {"agent": agent, "recent": history}, "")
    lines = _details(agent)
    width = max(len(label) for label, _ in lines)
    for label, text in lines:
        print(f"{label.ljust(width)}  {text}")
    print()
    if history is None:
        print("recent metrics: this token may not read the agent's summaries")
        return 0
    labels = list(WINDOWS_MS)
    table = [
        [
            label,
            *(
                "/".join(_figure(name, span[k]) for k in ("min", "avg", "max")) if span else "-"
                for span in (history["windows"][w][name] for w in labels)
            ),
        ]
        for name, label in FIGURES
    ]
    print_table(["FIGURE", *(f"{w} MIN/AVG/MAX" for w in labels)], table)
    print()
    rows = [
        [ms_time(row["timestamp"]), *(_figure(name, row.get(name)) for name, _ in FIGURES)]
        for row in history["rows"]
    ]
    print_table(["TIME", "CPU%", "MEM USED", "LOAD1", "NET IN/S", "NET OUT/S"], rows)
    return 0


def cmd_agents_family(args: argparse.Namespace) -> int:
    """``taskd agents`` or ``taskd agents show UUID``."""
    if args.action is None:
        return cmd_agents(args)
    if args.uuid is None:
        raise CallFailed("show needs the agent's UUID", 2)
    return cmd_agents_show(args)


def add_agents_commands(sub: Any) -> None:
    """The ``taskd agents`` command: one parser, so its options go before or after ``show``."""
    agents = sub.add_parser(
        "agents",
        parents=[client_options()],
        help="the fleet at a glance: host, online state, CPU, memory, disk",
        description="List agents with their host facts and latest metrics (OFFLINE agents "
        "and disks over 90% full marked), or `show UUID` for one agent's details and "
        "recent metrics.",
        usage="taskd agents [show UUID] [options]",
    )
    agents.add_argument("action", nargs="?", choices=["show"], help="show one agent")
    agents.add_argument("uuid", nargs="?", help="show: the agent's UUID (or a unique start)")
    agents.add_argument("--online", action="store_true", help="only agents online now")
    agents.add_argument("--offline", action="store_true", help="only agents offline now")
    agents.add_argument("--search", help="only agents whose UUID, hostname, OS or address has TEXT")
    agents.set_defaults(func=client_command("taskd agents", cmd_agents_family))
