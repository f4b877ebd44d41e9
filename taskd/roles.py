"""Role presets: the limits of the tokens people create most often.

``taskd token create --role ...``, agent enrollment and the documentation all
take their limits from here, so a preset means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from taskd.errors import InvalidInput
from taskd.protocol import (
    TASK_TYPES,
    DynamicField,
    StaticField,
    canonical_uuid,
    limits_to_wire,
    parse_limits,
)

ROLES: tuple[str, ...] = ("agent", "caller", "readonly", "enroll")


def agent_limits(agent_uuid: str) -> list[dict[str, Any]]:
    """An agent's own token: receive its tasks, upload their results and report its host's
    monitoring data, on its UUID only."""
    return [
        {
            "scopes": [{"agent_uuid": agent_uuid}],
            "permissions": [
                {"task": "listen"},
                {"task": {"write": "*"}},
                {"static_monitoring": "write"},
                {"dynamic_monitoring": "write"},
                {"dynamic_monitoring_summary": "write"},
            ],
        }
    ]


def _before_monitoring(limits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An agent's limits as tokens made before monitoring have them (no report permissions)."""
    return [
        {
            **limit,
            "permissions": [
                p for p in limit["permissions"] if not any("monitoring" in k for k in p)
            ],
        }
        for limit in limits
    ]


def caller_limits(
    agent_uuids: Sequence[str], types: Sequence[str] = ("*",)
) -> list[dict[str, Any]]:
    """Create tasks of the ``types`` patterns on the given agents, read their results, list them."""
    permissions: list[dict[str, Any]] = [
        {"task": {action: pattern}} for pattern in types for action in ("create", "read")
    ]
    permissions.append({"agent": "list"})
    return [
        {
            "scopes": [{"agent_uuid": agent_uuid} for agent_uuid in agent_uuids],
            "permissions": permissions,
        }
    ]


def readonly_limits() -> list[dict[str, Any]]:
    """Read every task, cron, cron result and monitoring report and list the agents;
    change nothing."""
    static: list[dict[str, Any]] = [
        {"static_monitoring": {"read": field}} for field in get_args(StaticField)
    ]
    dynamic: list[dict[str, Any]] = [
        {"dynamic_monitoring": {"read": field}} for field in get_args(DynamicField)
    ]
    return [
        {
            "scopes": ["global"],
            "permissions": [
                {"task": {"read": "*"}},
                {"crontab": "read"},
                {"crontab_result": {"read": "*"}},
                {"agent": "list"},
                *static,
                *dynamic,
                {"dynamic_monitoring_summary": "read"},
            ],
        }
    ]


def enroll_limits() -> list[dict[str, Any]]:
    """Enroll new agents (``agent_enroll``) and nothing else."""
    return [{"scopes": ["global"], "permissions": [{"agent": "enroll"}]}]


def _pattern_matches_a_type(pattern: str) -> bool:
    if pattern.endswith("*"):
        return any(kind.startswith(pattern[:-1]) for kind in TASK_TYPES)
    return pattern in TASK_TYPES


def role_limits(
    role: str, *, agents: Sequence[str] = (), types: Sequence[str] = ("*",)
) -> list[dict[str, Any]]:
    """The limits of a preset role, validated; InvalidInput when the arguments do not fit it."""
    try:
        uuids = [canonical_uuid(agent) for agent in agents]
    except ValueError as exc:
        raise InvalidInput(f"agents: {exc}") from None
    if role == "agent":
        if len(uuids) != 1:
            raise InvalidInput("the agent role needs exactly one agent UUID")
        limits = agent_limits(uuids[0])
    elif role == "caller":
        if not uuids:
            raise InvalidInput("the caller role needs at least one agent UUID")
        if not types:
            raise InvalidInput("the caller role needs at least one task type pattern")
        unknown = [pattern for pattern in types if not _pattern_matches_a_type(pattern)]
        if unknown:
            raise InvalidInput(
                f"task type pattern(s) {', '.join(unknown)} match no task type; "
                f"known types: {', '.join(TASK_TYPES)}"
            )
        limits = caller_limits(uuids, types)
    elif role in ("readonly", "enroll"):
        if uuids:
            raise InvalidInput(f"the {role} role takes no agent UUIDs")
        limits = readonly_limits() if role == "readonly" else enroll_limits()
    else:
        raise InvalidInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return limits_to_wire(parse_limits(limits))


def describe_limits(limits: Any, is_super: bool = False) -> str:
    """A short name for a token's limits: the preset they equal, else ``custom``."""
    if is_super:
        return "super"
    for role in ("readonly", "enroll"):
        if limits == role_limits(role):
            return role
    if not (isinstance(limits, list) and len(limits) == 1 and isinstance(limits[0], dict)):
        return "custom"
    scopes = limits[0].get("scopes") or []
    uuids = [s["agent_uuid"] for s in scopes if isinstance(s, dict) and "agent_uuid" in s]
    if not uuids or len(uuids) != len(scopes):
        return "custom"
    own = agent_limits(uuids[0])
    if limits in (own, _before_monitoring(own)):
        return f"agent {uuids[0]}"
    creates = [
        p["task"]["create"]
        for p in limits[0].get("permissions") or []
        if isinstance(p, dict) and isinstance(p.get("task"), dict) and "create" in p["task"]
    ]
    if creates and limits == caller_limits(uuids, creates):
        where = f"{len(uuids)} agents" if len(uuids) > 1 else uuids[0]
        return f"caller {where} ({','.join(creates)})"
    return "custom"
