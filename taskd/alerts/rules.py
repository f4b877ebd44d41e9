"""Alert rules: the four kinds, their params, and their validation at the edge.

A rule on the wire (PROTOCOL.md section 13)::

    {"name", "kind", "targets": [uuid...] | "all", "params": {...},
     "channels": [names], "enable": true, "remind_ms"?: n}

- ``agent_offline {grace_ms}``: no connection and no report for ``grace_ms``.
- ``probe_failed {cron, consecutive}``: the cron's task failed on an agent
  ``consecutive`` times in a row.
- ``probe_latency {cron, above_ms, consecutive}``: its result took more than
  ``above_ms`` (or failed) ``consecutive`` times in a row.
- ``metric {field, above | below, for_ms}``: a summary figure beyond the threshold
  in every report for ``for_ms``.

Every fault is an ``InvalidParams`` (-32602) naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from taskd.errors import InvalidParams
from taskd.protocol import canonical_uuid

Kind = Literal["agent_offline", "probe_failed", "probe_latency", "metric"]
KINDS: tuple[Kind, ...] = ("agent_offline", "probe_failed", "probe_latency", "metric")
NAME_MAX = 128
MAX_TARGETS = 10_000
MAX_CHANNELS = 32
DAY_MS = 86_400_000
MIN_GRACE_MS = 1_000
MIN_REMIND_MS = 1_000


Reader = Callable[[Mapping[str, Any]], float | None]
"""Reads one figure from a summary row (None if the row lacks it)."""


def _ratio(part: str, whole: str, *, used: bool = False) -> Reader:
    def read(row: Mapping[str, Any]) -> float | None:
        value, total = row.get(part), row.get(whole)
        if value is None or not total:
            return None
        share = 100.0 * float(value) / float(total)
        return 100.0 - share if used else share

    return read


def _tenths(name: str) -> Reader:
    def read(row: Mapping[str, Any]) -> float | None:
        value = row.get(name)
        return None if value is None else value / 10

    return read


def _raw(name: str) -> Reader:
    def read(row: Mapping[str, Any]) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return read


METRIC_FIELDS: dict[str, Reader] = {
    # percent and load as people read them (the summary stores them times ten)
    "cpu_usage": _tenths("cpu_usage"),
    "load_one": _tenths("load_one"),
    "load_five": _tenths("load_five"),
    "load_fifteen": _tenths("load_fifteen"),
    "gpu_usage": _raw("gpu_usage"),
    # shares of a whole, in percent
    "available_memory_percent": _ratio("available_memory", "total_memory"),
    "used_memory_percent": _ratio("available_memory", "total_memory", used=True),
    "available_space_percent": _ratio("available_space", "total_space"),
    "used_space_percent": _ratio("available_space", "total_space", used=True),
    "used_swap_percent": _ratio("used_swap", "total_swap"),
    # the other figures as stored (bytes, bytes per second, counts)
    **{
        name: _raw(name)
        for name in (
            "available_memory",
            "used_memory",
            "available_space",
            "used_swap",
            "process_count",
            "tcp_connections",
            "udp_connections",
            "read_speed",
            "write_speed",
            "transmit_speed",
            "receive_speed",
        )
    },
}
"""The figures a metric rule can watch, each read from a stored summary row."""


@dataclass(frozen=True)
class AgentOffline:
    """``{grace_ms}``"""

    grace_ms: int


@dataclass(frozen=True)
class ProbeFailed:
    """``{cron, consecutive}``"""

    cron: str
    consecutive: int


@dataclass(frozen=True)
class ProbeLatency:
    """``{cron, above_ms, consecutive}``"""

    cron: str
    above_ms: float
    consecutive: int


@dataclass(frozen=True)
class Metric:
    """``{field, above | below, for_ms}``"""

    field: str
    above: float | None
    below: float | None
    for_ms: int

    def breached(self, value: float) -> bool:
        """Whether ``value`` is beyond the threshold."""
        if self.above is not None:
            return value > self.above
        assert self.below is not None
        return value < self.below

    def describe(self) -> str:
        """The condition in words: ``cpu_usage above 90``."""
        if self.above is not None:
            return f"{self.field} above {self.above:g}"
        return f"{self.field} below {self.below:g}"


Params = AgentOffline | ProbeFailed | ProbeLatency | Metric


@dataclass(frozen=True)
class Rule:
    """A checked rule; ``targets`` None means every agent."""

    name: str
    kind: Kind
    targets: tuple[str, ...] | None
    params: Params
    channels: tuple[str, ...]
    enable: bool = True
    remind_ms: int | None = None
    id: int = 0
    """The stored rule's id (0 before it is stored)."""

    def covers(self, agent_uuid: str) -> bool:
        """Whether the rule watches this agent."""
        return self.targets is None or agent_uuid in self.targets

    def to_wire(self) -> dict[str, Any]:
        """The rule as the wire shows it (``id`` included once stored)."""
        wire: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "targets": "all" if self.targets is None else list(self.targets),
            "params": params_to_wire(self.params),
            "channels": list(self.channels),
            "enable": self.enable,
        }
        if self.remind_ms is not None:
            wire["remind_ms"] = self.remind_ms
        if self.id:
            wire = {"id": self.id, **wire}
        return wire

    def row(self) -> dict[str, Any]:
        """The column values of the rule's row."""
        return {
            "name": self.name,
            "kind": self.kind,
            "targets": "all" if self.targets is None else list(self.targets),
            "params": params_to_wire(self.params),
            "channels": list(self.channels),
            "enable": self.enable,
            "remind_ms": self.remind_ms,
        }


def params_to_wire(params: Params) -> dict[str, Any]:
    """A rule's params as JSON."""
    match params:
        case AgentOffline(grace_ms):
            return {"grace_ms": grace_ms}
        case ProbeFailed(cron, consecutive):
            return {"cron": cron, "consecutive": consecutive}
        case ProbeLatency(cron, above_ms, consecutive):
            return {"cron": cron, "above_ms": above_ms, "consecutive": consecutive}
        case Metric(field, above, below, for_ms):
            threshold = {"above": above} if above is not None else {"below": below}
            return {"field": field, **threshold, "for_ms": for_ms}
    raise AssertionError(params)


def rule_from_row(row: Any) -> Rule:
    """The rule a stored row holds (it was checked when written)."""
    wire = {
        "name": row.name,
        "kind": row.kind,
        "targets": row.targets,
        "params": row.params,
        "channels": row.channels,
        "enable": row.enable,
    }
    if row.remind_ms is not None:
        wire["remind_ms"] = row.remind_ms
    rule = parse_rule(wire)
    return Rule(**{**rule.__dict__, "id": row.id})


# --------------------------------------------------------------------------- parsing


def parse_name(value: Any, field: str) -> str:
    """A channel or rule name: 1 to 128 printable characters without surrounding spaces."""
    if not isinstance(value, str):
        raise InvalidParams(f"{field}: must be a string")
    if not value or len(value) > NAME_MAX:
        raise InvalidParams(f"{field}: must be 1 to {NAME_MAX} characters")
    if value != value.strip() or not value.isprintable():
        raise InvalidParams(f"{field}: must be printable, without leading or trailing spaces")
    return value


def _int(params: Mapping[str, Any], key: str, field: str, low: int, high: int) -> int:
    value = params.get(key)
    if value is None:
        raise InvalidParams(f"{field}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{field}.{key}: must be an integer")
    if not low <= value <= high:
        raise InvalidParams(f"{field}.{key}: must be between {low} and {high}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParams(f"{field}: must be a number")
    if value != value or abs(value) > 1e18:
        raise InvalidParams(f"{field}: must be a finite number")
    return float(value)


def _only(params: Mapping[str, Any], allowed: set[str], field: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidParams(
            f"{field}: unknown key {unknown[0]!r}; expected {', '.join(sorted(allowed))}"
        )


def parse_params(kind: Kind, value: Any, field: str) -> Params:
    """The params of a rule of ``kind``."""
    if not isinstance(value, dict):
        raise InvalidParams(f"{field}: must be an object")
    if kind == "agent_offline":
        _only(value, {"grace_ms"}, field)
        return AgentOffline(_int(value, "grace_ms", field, MIN_GRACE_MS, 30 * DAY_MS))
    if kind in ("probe_failed", "probe_latency"):
        allowed = {"cron", "consecutive"} | ({"above_ms"} if kind == "probe_latency" else set())
        _only(value, allowed, field)
        cron = parse_name(value.get("cron"), f"{field}.cron")
        consecutive = _int(value, "consecutive", field, 1, 1000)
        if kind == "probe_failed":
            return ProbeFailed(cron, consecutive)
        if "above_ms" not in value:
            raise InvalidParams(f"{field}.above_ms: required")
        above_ms = _number(value["above_ms"], f"{field}.above_ms")
        if above_ms <= 0:
            raise InvalidParams(f"{field}.above_ms: must be above 0")
        return ProbeLatency(cron, above_ms, consecutive)
    _only(value, {"field", "above", "below", "for_ms"}, field)
    name = value.get("field")
    if name not in METRIC_FIELDS:
        raise InvalidParams(
            f"{field}.field: unknown summary field {name!r}; expected one of "
            + ", ".join(METRIC_FIELDS)
        )
    if ("above" in value) == ("below" in value):
        raise InvalidParams(f"{field}: needs exactly one of above, below")
    above = _number(value["above"], f"{field}.above") if "above" in value else None
    below = _number(value["below"], f"{field}.below") if "below" in value else None
    return Metric(name, above, below, _int(value, "for_ms", field, 0, 30 * DAY_MS))


def parse_targets(value: Any, field: str) -> tuple[str, ...] | None:
    """``"all"`` (None) or a list of agent UUIDs (canonical, each once)."""
    if value == "all":
        return None
    if not isinstance(value, list):
        raise InvalidParams(f'{field}: must be "all" or a list of agent UUIDs')
    if not value or len(value) > MAX_TARGETS:
        raise InvalidParams(f"{field}: must list 1 to {MAX_TARGETS} agent UUIDs")
    targets: dict[str, None] = {}
    for index, item in enumerate(value):
        try:
            targets[canonical_uuid(item)] = None
        except (TypeError, ValueError, AttributeError):
            raise InvalidParams(f"{field}.{index}: must be an agent UUID") from None
    return tuple(targets)


def parse_channels(value: Any, field: str) -> tuple[str, ...]:
    """A list of channel names (each once)."""
    if not isinstance(value, list):
        raise InvalidParams(f"{field}: must be a list of channel names")
    if len(value) > MAX_CHANNELS:
        raise InvalidParams(f"{field}: at most {MAX_CHANNELS} channels")
    names = [parse_name(item, f"{field}.{index}") for index, item in enumerate(value)]
    return tuple(dict.fromkeys(names))


def parse_rule(value: Any, field: str = "rule") -> Rule:
    """A rule from its wire form; InvalidParams naming the first faulty field."""
    if not isinstance(value, dict):
        raise InvalidParams(f"{field}: must be an object")
    _only(
        value,
        {"id", "name", "kind", "targets", "params", "channels", "enable", "remind_ms"},
        field,
    )
    name = parse_name(value.get("name"), f"{field}.name")
    kind = value.get("kind")
    if kind not in KINDS:
        raise InvalidParams(f"{field}.kind: must be one of {', '.join(KINDS)}, not {kind!r}")
    if "targets" not in value:
        raise InvalidParams(f"{field}.targets: required")
    targets = parse_targets(value["targets"], f"{field}.targets")
    params = parse_params(kind, value.get("params"), f"{field}.params")
    channels = parse_channels(value.get("channels", []), f"{field}.channels")
    enable = value.get("enable", True)
    if not isinstance(enable, bool):
        raise InvalidParams(f"{field}.enable: must be true or false")
    remind_ms = value.get("remind_ms")
    if remind_ms is not None:
        remind_ms = _int(value, "remind_ms", field, MIN_REMIND_MS, 30 * DAY_MS)
    return Rule(name, kind, targets, params, channels, enable, remind_ms)
