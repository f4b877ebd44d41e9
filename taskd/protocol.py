"""Wire types: tasks, results, replies, method params, query conditions, crons, KV, token limits.

Every type parses and validates once at the edge (``parse_*``) and serialises
back to the exact JSON of the wire spec (``to_wire``, or orjson for the reply
dataclasses). A method param's type says how the dispatcher parses it
(``Parse``). Variants are serde "externally tagged": a unit variant is a bare
string, any other a one-key object whose key is the variant name. Each task kind
is declared once, by its variant class.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    NotRequired,
    Protocol,
    TypeVar,
    Union,
    get_args,
)
from urllib.parse import urlsplit

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError
from typing_extensions import TypeAliasType, TypedDict

from taskd.errors import InvalidInput, InvalidParams

_INVALID_INPUT = "invalid_input"
"""Error type of a well-formed value that is not acceptable: parse_as answers it with 108."""

DnsRecordType = Literal["a", "aaaa", "cname", "mx", "txt", "ns", "srv", "ptr", "soa", "caa"]
DNS_RECORD_TYPES: tuple[str, ...] = get_args(DnsRecordType)

_CANONICAL_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-:%\[\]]{1,253}$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_VERSION_RE = re.compile(r"^v\d{1,6}\.\d{1,6}\.\d{1,6}(?:-[0-9A-Za-z.]{1,32})?$")
_MAX_TEXT = 1 << 20


def canonical_uuid(value: str) -> str:
    """Return the lower-case hyphenated form of a UUID string, or raise ValueError."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("must be a UUID string")
    if _CANONICAL_UUID_RE.fullmatch(value):  # the usual case, without building a UUID
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a valid UUID") from None


def _check_host(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not _HOST_RE.match(host) or bare.startswith("-") or not bare:
        raise ValueError(f"{host!r} is not a valid host name or IP address")
    if ":" in bare:
        try:
            ipaddress.IPv6Address(bare.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{host!r} is not a valid host name or IP address") from None
    return host


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port, or raise ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} must be host:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has no valid port (1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write IPv6 addresses as [addr]:port")
    _check_host(host)
    return host, int(port_text)


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    if len(value) > 8192:
        raise ValueError("URL longer than 8192 characters")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in schemes or not parts.netloc or not parts.hostname:
        raise ValueError(f"{value!r} must be an absolute {'/'.join(schemes)} URL")
    if any(c in value for c in " \r\n\t"):
        raise ValueError(f"{value!r} contains whitespace")
    return value


class WireModel(BaseModel):
    """Strict, immutable base: unknown fields and type coercion are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- task types


class TaskVariant(WireModel):
    """Base of every TaskEventType variant; ``kind`` is its wire tag."""

    kind: ClassVar[str]

    def to_wire(self) -> Any:
        """The exact JSON value of this task type."""
        return self.model_dump(mode="json", exclude_none=True)


def _null_form(name: str) -> dict[str, Any]:
    """The JSON Schema of a unit variant's object form ``{"<name>": null}``."""
    return {
        "type": "object",
        "properties": {name: {"type": "null"}},
        "required": [name],
        "additionalProperties": False,
    }


def _is_unit(value: Any, name: str) -> bool:
    """Whether ``value`` is the unit variant ``name``: the bare string or ``{"<name>": null}``.

    serde accepts both forms; NodeGet-board sends the object form.
    """
    if isinstance(value, str):
        return value == name
    return isinstance(value, dict) and len(value) == 1 and name in value and value[name] is None


class _UnitVariant(TaskVariant):
    @model_validator(mode="before")
    @classmethod
    def _from_tag(cls, value: Any) -> Any:
        if _is_unit(value, cls.kind):
            return {}
        raise ValueError(f"expected the string {cls.kind!r} or {{{cls.kind!r}: null}}")

    @model_serializer
    def _to_tag(self) -> str:
        return self.kind

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "title": cls.__name__,
            "anyOf": [{"const": cls.kind, "type": "string"}, _null_form(cls.kind)],
        }

    def to_wire(self) -> Any:
        """The bare tag string."""
        return self.kind


class Ping(TaskVariant):
    """ICMP echo to a host name or address."""

    kind: ClassVar[str] = "ping"
    ping: str

    @field_validator("ping")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_host(value)


class TcpPing(TaskVariant):
    """TCP connect time to ``host:port``."""

    kind: ClassVar[str] = "tcp_ping"
    tcp_ping: str

    @field_validator("tcp_ping")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value


class HttpPing(TaskVariant):
    """Time to response headers of a GET."""

    kind: ClassVar[str] = "http_ping"
    http_ping: str

    @field_validator("http_ping")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("http", "https"))


class HttpRequestSpec(WireModel):
    """An HTTP request an agent makes on the caller's behalf."""

    url: str
    method: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    body_base64: str | None = None
    ip: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("http", "https"))

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if not _TOKEN_RE.match(value):
            raise ValueError(f"{value!r} is not a valid HTTP method")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in text for c in "\r\n\x00"):
                raise ValueError(f"header {name!r} contains CR, LF or NUL")
        return value

    @field_validator("body_base64")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("is not valid base64") from None
        return value

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None and value not in ("ipv4 auto", "ipv6 auto"):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} must be a local IP address, 'ipv4 auto' or 'ipv6 auto'"
                ) from None
        return value

    @model_validator(mode="after")
    def _one_body(self) -> HttpRequestSpec:
        if self.body is not None and self.body_base64 is not None:
            raise ValueError("body and body_base64 are mutually exclusive")
        return self


class HttpRequest(TaskVariant):
    """A full HTTP request."""

    kind: ClassVar[str] = "http_request"
    http_request: HttpRequestSpec


class DnsSpec(WireModel):
    """A DNS lookup of several record types."""

    domain: str
    record_types: list[DnsRecordType] = Field(min_length=1, max_length=len(DNS_RECORD_TYPES))
    dns_server: str | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if not value or len(value) > 253 or any(c.isspace() or c == "\x00" for c in value):
            raise ValueError(f"{value!r} is not a valid domain name")
        return value

    @field_validator("dns_server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is not None:
            host, _ = split_host_port(value)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{value!r} must be ip:port") from None
        return value

    @model_validator(mode="after")
    def _ptr_takes_ip(self) -> DnsSpec:
        if "ptr" in self.record_types:
            try:
                ipaddress.ip_address(self.domain)
            except ValueError:
                raise ValueError("a ptr lookup takes an IP address as domain") from None
        return self


class Dns(TaskVariant):
    """A DNS lookup."""

    kind: ClassVar[str] = "dns"
    dns: DnsSpec


class WebShellSpec(WireModel):
    """Where the agent connects its terminal."""

    url: str
    terminal_id: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("ws", "wss"))

    @field_validator("terminal_id")
    @classmethod
    def _terminal_id(cls, value: str) -> str:
        return canonical_uuid(value)


class WebShell(TaskVariant):
    """An interactive terminal relayed through the server."""

    kind: ClassVar[str] = "web_shell"
    web_shell: WebShellSpec


class ExecuteSpec(WireModel):
    """A command run without a shell."""

    cmd: str = Field(max_length=4096)
    args: list[str] = Field(max_length=4096)

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, value: str) -> str:
        if not value.strip():
            # well-formed, so 108 as in NodeGet, not a params error
            raise PydanticCustomError(_INVALID_INPUT, "must not be empty or blank")
        if "\x00" in value:
            raise ValueError("cmd contains a NUL byte")
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        if any("\x00" in arg for arg in value):
            raise ValueError("an argument contains a NUL byte")
        return value


class Execute(TaskVariant):
    """Run a program."""

    kind: ClassVar[str] = "execute"
    execute: ExecuteSpec


class ReadConfig(_UnitVariant):
    """Read the agent's configuration (secrets redacted)."""

    kind: ClassVar[str] = "read_config"


class EditConfig(TaskVariant):
    """Replace the agent's configuration with a whole TOML document."""

    kind: ClassVar[str] = "edit_config"
    edit_config: str = Field(max_length=_MAX_TEXT)

    @field_validator("edit_config")
    @classmethod
    def _toml(cls, value: str) -> str:
        # only the syntax: the agent that receives it applies its own schema (a NodeGet
        # agent's keys differ from taskd's), and taskd's agent refuses what it cannot apply
        try:
            tomllib.loads(value)
        except tomllib.TOMLDecodeError as exc:
            raise PydanticCustomError(
                _INVALID_INPUT, "not a TOML document: {reason}", {"reason": str(exc)}
            ) from None
        return value


class Ip(_UnitVariant):
    """The agent's public IPv4 and IPv6 addresses."""

    kind: ClassVar[str] = "ip"


class Version(_UnitVariant):
    """The agent's version information."""

    kind: ClassVar[str] = "version"


class SelfUpdate(TaskVariant):
    """Install another taskd version into the agent and restart it."""

    kind: ClassVar[str] = "self_update"
    self_update: str

    @field_validator("self_update")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION_RE.match(value):
            raise ValueError(f"{value!r} is not a version of the form vX.Y.Z")
        return value


def variant_tag(value: Any) -> str | None:
    """The variant name of an externally tagged value (or model), None if it has no tag."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if isinstance(key, str) else None
    if isinstance(value, TaskVariant | ResultVariant):
        return value.kind
    return None


_V = TypeVar("_V", bound=BaseModel)


def _tagged(*variants: type[_V]) -> Any:
    members = tuple(Annotated[v, Tag(v.kind)] for v in variants)  # type: ignore[attr-defined]
    return Annotated[
        Union[members],  # noqa: UP007 - a runtime tuple of members
        Discriminator(
            variant_tag,
            custom_error_type="unknown_variant",
            custom_error_message="unknown variant",
        ),
    ]


TASK_VARIANTS: tuple[type[TaskVariant], ...] = (
    Ping,
    TcpPing,
    HttpPing,
    HttpRequest,
    Dns,
    WebShell,
    Execute,
    ReadConfig,
    EditConfig,
    Ip,
    Version,
    SelfUpdate,
)
TASK_TYPES: tuple[str, ...] = tuple(variant.kind for variant in TASK_VARIANTS)
"""Every task kind, in wire order: the one list, read off the variants."""
if TYPE_CHECKING:
    TaskEventType = TaskVariant
    TaskKind = str
else:
    TaskEventType = TypeAliasType("TaskEventType", _tagged(*TASK_VARIANTS))
    TaskKind = Literal[TASK_TYPES]
TASK_EVENT_TYPE: TypeAdapter[TaskVariant] = TypeAdapter(TaskEventType)


# --------------------------------------------------------------------------- results


class ResultVariant(WireModel):
    """Base of every TaskEventResult variant; ``kind`` is its wire tag."""

    kind: ClassVar[str]

    def to_wire(self) -> Any:
        """The exact JSON value of this result."""
        return self.model_dump(mode="json", exclude_none=True)


class PingResult(ResultVariant):
    """ICMP round-trip time in milliseconds."""

    kind: ClassVar[str] = "ping"
    ping: float = Field(ge=0, allow_inf_nan=False)


class TcpPingResult(ResultVariant):
    """TCP connect time in milliseconds."""

    kind: ClassVar[str] = "tcp_ping"
    tcp_ping: float = Field(ge=0, allow_inf_nan=False)


class HttpPingResult(ResultVariant):
    """Time to the response headers of a GET, in milliseconds."""

    kind: ClassVar[str] = "http_ping"
    http_ping: float = Field(ge=0, allow_inf_nan=False)


class HttpResponse(WireModel):
    """What an http_request got back."""

    status: int = Field(ge=100, le=999)
    headers: list[dict[str, str]]
    body: str | None = None
    body_base64: str | None = None

    @field_validator("headers")
    @classmethod
    def _pairs(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        if any(len(pair) != 1 for pair in value):
            raise ValueError("each header must be an object with exactly one name")
        return value


class HttpRequestResult(ResultVariant):
    """An HTTP response."""

    kind: ClassVar[str] = "http_request"
    http_request: HttpResponse


class DnsRecord(WireModel):
    """One answer of a DNS lookup."""

    record_type: DnsRecordType
    time: float = Field(ge=0, allow_inf_nan=False)
    data: str


class DnsResult(ResultVariant):
    """Every answer of a DNS lookup."""

    kind: ClassVar[str] = "dns"
    dns: list[DnsRecord]


class WebShellResult(ResultVariant):
    """The terminal session ended."""

    kind: ClassVar[str] = "web_shell"
    web_shell: bool


class ExecuteResult(ResultVariant):
    """Command output in the wire format (stdout, stderr, exit code)."""

    kind: ClassVar[str] = "execute"
    execute: str


class ReadConfigResult(ResultVariant):
    """The agent configuration with secrets redacted."""

    kind: ClassVar[str] = "read_config"
    read_config: str


class EditConfigResult(ResultVariant):
    """The configuration was replaced."""

    kind: ClassVar[str] = "edit_config"
    edit_config: bool


class IpResult(ResultVariant):
    """Public IPv4 and IPv6 addresses (null when unknown)."""

    kind: ClassVar[str] = "ip"
    ip: tuple[str | None, str | None] = Field(strict=False)

    @field_validator("ip")
    @classmethod
    def _addresses(cls, value: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
        for address, family in zip(
            value, (ipaddress.IPv4Address, ipaddress.IPv6Address), strict=True
        ):
            if address is not None:
                try:
                    family(address)
                except ValueError:
                    raise ValueError(f"{address!r} is not an {family.__name__}") from None
        return value


class VersionResult(ResultVariant):
    """Agent version details."""

    kind: ClassVar[str] = "version"
    version: dict[str, Any]

    @field_validator("version")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_free_json(value, 1)
        return value


_MAX_FREE_DEPTH = 32
"""Nesting allowed in free-form result JSON: replies wrap it in a few more levels, and
the encoders stop at 255 (a deeper stored value would break every query that reads it)."""


def _check_free_json(value: Any, depth: int) -> None:
    """Refuse free-form JSON that could not be stored and answered again."""
    if depth > _MAX_FREE_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_FREE_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_free_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_free_json(item, depth + 1)


class SelfUpdateResult(ResultVariant):
    """Whether the update was installed."""

    kind: ClassVar[str] = "self_update"
    self_update: bool


RESULT_VARIANTS: tuple[type[ResultVariant], ...] = (
    PingResult,
    TcpPingResult,
    HttpPingResult,
    HttpRequestResult,
    DnsResult,
    WebShellResult,
    ExecuteResult,
    ReadConfigResult,
    EditConfigResult,
    IpResult,
    VersionResult,
    SelfUpdateResult,
)
if TYPE_CHECKING:
    TaskEventResult = ResultVariant
else:
    TaskEventResult = TypeAliasType("TaskEventResult", _tagged(*RESULT_VARIANTS))
TASK_EVENT_RESULT: TypeAdapter[ResultVariant] = TypeAdapter(TaskEventResult)


class TaskResponse(WireModel):
    """An agent's upload: the outcome of one task."""

    task_id: int = Field(ge=1, lt=1 << 63)
    agent_uuid: str
    task_token: str = Field(max_length=64)
    timestamp: int = Field(ge=0, lt=1 << 53)
    success: bool
    error_message: str | None = Field(default=None, max_length=_MAX_TEXT)
    task_event_result: TaskEventResult | None = None

    @field_validator("agent_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return canonical_uuid(value)


# --------------------------------------------------------------------------- replies
#
# Replies carry values that were checked when they came in and stored as JSON, so
# they are plain dataclasses: built without a validation pass, serialised by orjson
# natively, field by field in declaration order, and their JSON Schemas generated
# from the same declarations. No __slots__: orjson serialises a dataclass through
# its __dict__ as fast as a dict, one with slots at half that speed.

if TYPE_CHECKING:
    TaskEventTypeJson = Any
    TaskEventResultJson = Any
else:
    TaskEventTypeJson = TaskEventType
    """A TaskEventType in its JSON form, as stored."""
    TaskEventResultJson = TaskEventResult
    """A TaskEventResult in its JSON form, as stored."""

_REPLY = ConfigDict(extra="forbid")
"""The JSON Schema of a reply promises no other members."""


@dataclass
class TaskPush:
    """What the server pushes to an agent's subscription."""

    __pydantic_config__ = _REPLY

    task_id: int
    task_token: str
    task_event_type: TaskEventTypeJson

    def serialize(self, subscription_id: int) -> bytes:
        """The ``task_register_task`` notification that delivers this task."""
        return orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "task_register_task",
                "params": {"subscription": subscription_id, "result": self},
            }
        )


@dataclass
class TaskRecord:
    """One task as returned by task_query_task (``timestamp``/``success`` null while running)."""

    __pydantic_config__ = _REPLY

    task_id: int
    uuid: str
    timestamp: int | None
    success: bool | None
    error_message: str | None
    task_event_type: TaskEventTypeJson
    task_event_result: TaskEventResultJson | None
    cron_source: str | None
    created_by: str | None = None


@dataclass(frozen=True)
class TaskEventResponse:
    """A task's result as committed: what a blocking call answers and its waiters receive."""

    __pydantic_config__ = _REPLY

    task_id: int
    agent_uuid: str
    task_token: str
    timestamp: int | None
    success: bool | None
    error_message: str | None
    task_event_result: TaskEventResultJson | None


class IdReply(TypedDict):
    """``{"id": n}``: the task created or answered, the cron created."""

    id: int


class TaskDeleted(TypedDict):
    """What task_delete_task removed."""

    success: bool
    deleted: int
    condition_count: int


# --------------------------------------------------------------------------- query conditions


class TaskIdCondition(WireModel):
    """``{"task_id": n}``"""

    task_id: int = Field(ge=0, lt=1 << 63)


class UuidCondition(WireModel):
    """``{"uuid": "<agent>"}``"""

    uuid: str

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return canonical_uuid(value)


class TimestampFromToCondition(WireModel):
    """``{"timestamp_from_to": [a, b]}`` inclusive, ms."""

    timestamp_from_to: tuple[int, int] = Field(strict=False)


class TimestampFromCondition(WireModel):
    """``{"timestamp_from": a}`` inclusive, ms."""

    timestamp_from: int


class TimestampToCondition(WireModel):
    """``{"timestamp_to": b}`` inclusive, ms."""

    timestamp_to: int


class TypeCondition(WireModel):
    """``{"type": "ping"}`` exact task type."""

    type: TaskKind


class CronSourceCondition(WireModel):
    """``{"cron_source": "name"}``"""

    cron_source: str = Field(max_length=128)


class LimitCondition(WireModel):
    """``{"limit": n}``"""

    limit: int = Field(ge=0, lt=1 << 53)


_TaskFlag = Literal["is_success", "is_failure", "is_running", "last"]
_FLAGS: tuple[str, ...] = get_args(_TaskFlag)
# schema only (conditions are parsed by _parse_conditions): {"last": null} and the like
_TaskFlagObject = Annotated[
    dict[str, None], WithJsonSchema({"anyOf": [_null_form(name) for name in _FLAGS]})
]
TaskQueryCondition = TypeAliasType(
    "TaskQueryCondition",
    Union[  # noqa: UP007
        _TaskFlag,
        _TaskFlagObject,
        TaskIdCondition,
        UuidCondition,
        TimestampFromToCondition,
        TimestampFromCondition,
        TimestampToCondition,
        TypeCondition,
        CronSourceCondition,
        LimitCondition,
    ],
)
"""One condition of a task query (schema only: _parse_conditions parses them)."""
_TASK_CONDITIONS: dict[str, type[WireModel]] = {
    "task_id": TaskIdCondition,
    "uuid": UuidCondition,
    "timestamp_from_to": TimestampFromToCondition,
    "timestamp_from": TimestampFromCondition,
    "timestamp_to": TimestampToCondition,
    "type": TypeCondition,
    "cron_source": CronSourceCondition,
    "limit": LimitCondition,
}


class TaskQuery(WireModel):
    """Parsed TaskQueryCondition list, all conditions ANDed."""

    task_ids: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    cron_sources: tuple[str, ...] = ()
    timestamp_from: int | None = None
    timestamp_to: int | None = None
    is_success: bool = False
    is_failure: bool = False
    is_running: bool = False
    limit: int | None = None
    condition_count: int = 0


DEFAULT_QUERY_LIMIT = 1000


def _format_error(field: str, exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:3]:
        path: list[str] = []
        for part in (field, *error["loc"]):
            # a tagged variant repeats its tag as the field name: show it once
            if str(part) and (not path or path[-1] != str(part)):
                path.append(str(part))
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{'.'.join(path)}: {message}")
    return "; ".join(parts)


_M = TypeVar("_M")


def parse_as(adapter: TypeAdapter[_M] | Callable[[Any], _M], field: str, value: Any) -> _M:
    """Validate ``value`` for the param ``field``; raise InvalidParams naming the field.

    A value whose only faults are well-formed but unacceptable raises InvalidInput.
    """
    try:
        if isinstance(adapter, TypeAdapter):
            return adapter.validate_python(value)
        return adapter(value)
    except ValidationError as exc:
        unacceptable = all(error["type"] == _INVALID_INPUT for error in exc.errors())
        raise (InvalidInput if unacceptable else InvalidParams)(_format_error(field, exc)) from None
    except ValueError as exc:
        raise InvalidParams(f"{field}: {exc}") from None


def parse_task_event_type(value: Any, field: str = "task_event_type") -> TaskVariant:
    """Parse a TaskEventType; unknown variants and bad fields raise InvalidParams."""
    tag = variant_tag(value)
    if tag is None:
        raise InvalidParams(f"{field}: must be a task type name or an object with one key")
    if tag not in TASK_TYPES:
        raise InvalidParams(
            f"{field}: unknown task type {tag!r}; expected one of {', '.join(TASK_TYPES)}"
        )
    return parse_as(TASK_EVENT_TYPE, field, value)


def parse_task_event_result(value: Any, field: str = "task_event_result") -> ResultVariant:
    """Parse a TaskEventResult; unknown variants and bad fields raise InvalidParams."""
    tag = variant_tag(value)
    if tag not in TASK_TYPES:
        raise InvalidParams(f"{field}: unknown result type {tag!r}")
    return parse_as(TASK_EVENT_RESULT, field, value)


def parse_uuid(value: Any, field: str) -> str:
    """Validate an agent UUID param and return its canonical form."""
    return parse_as(canonical_uuid, field, value)


class Parser(Protocol):
    """A param parser: the value as it came, the name errors give it → the checked value."""

    def __call__(self, value: Any, field: str) -> Any: ...


@dataclass(frozen=True)
class Parse:
    """In a method param's ``Annotated`` type: how the param is parsed, and what it is on the wire.

    The dispatcher calls ``parse(value, field)`` (``field``: the param's name unless
    given here) and hands the method what it returns. The param's JSON Schema is that
    of ``wire``, by default the annotated type itself. A param type without this
    marker is validated by pydantic.
    """

    parse: Parser
    field: str | None = None
    wire: Any = None

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return handler(source if self.wire is None else self.wire)


def _token(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"{field}: must be a string KEY:SECRET or USERNAME|PASSWORD")
    return value


Token = Annotated[
    str,
    Parse(_token),
    WithJsonSchema({"type": "string", "description": "KEY:SECRET or USERNAME|PASSWORD"}),
]
"""The caller's credentials (the method authenticates them)."""
Uuid = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
"""A UUID in its canonical text form."""
AgentUuid = Annotated[Uuid, Parse(parse_uuid)]
"""An agent's UUID, parsed into canonical form."""


def _parse_conditions(
    value: Any, field: str, known: dict[str, type[WireModel]], flags: Sequence[str]
) -> list[str | WireModel]:
    if not isinstance(value, list):
        raise InvalidParams(f"{field}: must be a list of conditions")
    if len(value) > 1000:
        raise InvalidParams(f"{field}: more than 1000 conditions")
    parsed: list[str | WireModel] = []
    for index, item in enumerate(value):
        where = f"{field}.{index}"
        tag = variant_tag(item)
        if tag is not None and tag in flags:
            if not _is_unit(item, tag):
                raise InvalidParams(
                    f"{where}: {tag!r} takes no value; write {tag!r} or {{{tag!r}: null}}"
                )
            parsed.append(tag)  # the bare string, whichever form was sent
            continue
        if isinstance(item, str):
            raise InvalidParams(f"{where}: unknown condition {item!r}")
        model = known.get(tag) if tag is not None and isinstance(item, dict) else None
        if model is None:
            expected = ", ".join([*flags, *known])
            raise InvalidParams(f"{where}: unknown condition {tag!r}; expected one of {expected}")
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as exc:
            raise InvalidParams(_format_error(where, exc)) from None
    return parsed


@dataclass
class _Gathered:
    """What a condition list says, gathered in one pass (all conditions ANDed)."""

    values: dict[str, list[Any]] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    lows: list[int] = field(default_factory=list)
    highs: list[int] = field(default_factory=list)
    limit: int | None = None
    last: bool = False

    @classmethod
    def of(cls, conditions: Sequence[str | WireModel]) -> _Gathered:
        """Sort each parsed condition into values, flags, time bounds and limit."""
        gathered = cls()
        for cond in conditions:
            if cond == "last":
                gathered.last = True
            elif isinstance(cond, str):
                gathered.flags[cond] = True
            else:
                [name] = type(cond).model_fields  # every condition model has one field
                value = getattr(cond, name)
                if name.endswith("_from_to"):
                    gathered.lows.append(value[0])
                    gathered.highs.append(value[1])
                elif name.endswith("_from"):
                    gathered.lows.append(value)
                elif name.endswith("_to"):
                    gathered.highs.append(value)
                elif name == "limit":
                    gathered.limit = value if gathered.limit is None else min(gathered.limit, value)
                else:
                    gathered.values.setdefault(name, []).append(value)
        return gathered

    def take(self, name: str) -> tuple[Any, ...]:
        """Every value given for one condition."""
        return tuple(self.values.get(name, ()))

    @property
    def low(self) -> int | None:
        """The latest lower time bound."""
        return max(self.lows) if self.lows else None

    @property
    def high(self) -> int | None:
        """The earliest upper time bound."""
        return min(self.highs) if self.highs else None

    @property
    def final_limit(self) -> int | None:
        """``last`` wins over any ``limit``."""
        return 1 if self.last else self.limit


def parse_task_conditions(value: Any, field: str = "condition") -> TaskQuery:
    """Parse a TaskQueryCondition list into one TaskQuery."""
    gathered = _Gathered.of(_parse_conditions(value, field, _TASK_CONDITIONS, _FLAGS))
    return TaskQuery(
        task_ids=gathered.take("task_id"),
        uuids=gathered.take("uuid"),
        types=gathered.take("type"),
        cron_sources=gathered.take("cron_source"),
        timestamp_from=gathered.low,
        timestamp_to=gathered.high,
        limit=gathered.final_limit,
        condition_count=len(value),
        **gathered.flags,
    )


def parse_task_query(value: Any, field: str = "task_data_query") -> TaskQuery:
    """Parse ``{"condition": [...]}``."""
    if not isinstance(value, dict) or set(value) != {"condition"}:
        raise InvalidParams(f'{field}: must be an object {{"condition": [...]}}')
    return parse_task_conditions(value["condition"], f"{field}.condition")


class TaskDataQuery(TypedDict):
    """``{"condition": [...]}``: a task query on the wire."""

    condition: list[TaskQueryCondition]


MAX_BLOCKING_MS = 300_000
MAX_QUEUE_TTL_MS = 30 * 24 * 3600 * 1000

TaskType = Annotated[TaskEventType, Parse(parse_task_event_type, "task_event_type")]
"""A task to create; errors name it ``task_event_type``, as NodeGet does."""
TaskQueryParam = Annotated[TaskQuery, Parse(parse_task_query, wire=TaskDataQuery)]
"""``{"condition": [...]}``, parsed into one TaskQuery."""
TaskConditions = Annotated[TaskQuery, Parse(parse_task_conditions, wire=list[TaskQueryCondition])]
"""A bare condition list, parsed into one TaskQuery."""
TimeoutMs = Annotated[
    int,
    Field(
        ge=1,
        le=1 << 53,
        strict=True,
        description=f"milliseconds; at most {MAX_BLOCKING_MS} are waited (longer is clamped)",
    ),
]
QueueTtlMs = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_QUEUE_TTL_MS,
        strict=True,
        description="how long a task waits for an offline agent, in milliseconds",
    ),
]
MAX_RETENTION_MS = 3650 * 86_400_000
ResultRetentionMs = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_RETENTION_MS,
        strict=True,
        description="taskd extension: how long this cron's results are kept, in milliseconds "
        "(0: the server's default)",
    ),
]
SubscriptionId = Annotated[int, Field(ge=0, le=1 << 63, strict=True)]


# --------------------------------------------------------------------------- crontab


class AgentCronTask(WireModel):
    """``{"task": <TaskEventType>}``"""

    task: TaskEventType


class AgentCron(WireModel):
    """``{"agent": [["<uuid>", ...], {"task": ...}]}``; the list may be empty (fires nothing)."""

    kind: ClassVar[str] = "agent"
    agent: tuple[list[str], AgentCronTask] = Field(strict=False)

    @field_validator("agent")
    @classmethod
    def _uuids(cls, value: tuple[list[str], AgentCronTask]) -> tuple[list[str], AgentCronTask]:
        uuids, task = value
        # empty is how NodeGet-board drops a deleted agent from a cron that had only it
        if len(uuids) > 100_000:
            raise ValueError("more than 100000 agents")
        canonical = list(dict.fromkeys(canonical_uuid(u) for u in uuids))
        return canonical, task

    @property
    def uuids(self) -> list[str]:
        """The target agents."""
        return self.agent[0]

    @property
    def task(self) -> TaskVariant:
        """The task each fire creates."""
        return self.agent[1].task

    def to_wire(self) -> Any:
        """The exact JSON value of this cron type."""
        return {"agent": [self.uuids, {"task": self.task.to_wire()}]}


class ServerCron(WireModel):
    """``{"server": ...}`` (NodeGet server-side scripts; taskd refuses them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)
    kind: ClassVar[str] = "server"
    server: Any


if TYPE_CHECKING:
    CronType = AgentCron | ServerCron
else:
    CronType = TypeAliasType(
        "CronType",
        Annotated[
            Union[Annotated[AgentCron, Tag("agent")], Annotated[ServerCron, Tag("server")]],  # noqa: UP007
            Discriminator(
                variant_tag,
                custom_error_type="unknown_variant",
                custom_error_message="unknown variant",
            ),
        ],
    )
CRON_TYPE: TypeAdapter[AgentCron | ServerCron] = TypeAdapter(CronType)


class CronIdCondition(WireModel):
    """``{"id": n}``"""

    id: int


class CronRefCondition(WireModel):
    """``{"cron_id": n}``"""

    cron_id: int


class CronNameCondition(WireModel):
    """``{"cron_name": "name"}``"""

    cron_name: str = Field(max_length=128)


class RunTimeFromToCondition(WireModel):
    """``{"run_time_from_to": [a, b]}``"""

    run_time_from_to: tuple[int, int] = Field(strict=False)


class RunTimeFromCondition(WireModel):
    """``{"run_time_from": a}``"""

    run_time_from: int


class RunTimeToCondition(WireModel):
    """``{"run_time_to": b}``"""

    run_time_to: int


_CronResultFlag = Literal["is_success", "is_failure", "last"]
_CRON_RESULT_FLAGS: tuple[str, ...] = get_args(_CronResultFlag)
_CronResultFlagObject = Annotated[
    dict[str, None],
    WithJsonSchema({"anyOf": [_null_form(name) for name in _CRON_RESULT_FLAGS]}),
]
CronResultCondition = TypeAliasType(
    "CronResultCondition",
    Union[  # noqa: UP007
        _CronResultFlag,
        _CronResultFlagObject,
        CronIdCondition,
        CronRefCondition,
        CronNameCondition,
        RunTimeFromToCondition,
        RunTimeFromCondition,
        RunTimeToCondition,
        LimitCondition,
    ],
)
"""One condition of a crontab-result query (schema only: _parse_conditions parses them)."""
_CRON_RESULT_CONDITIONS: dict[str, type[WireModel]] = {
    "id": CronIdCondition,
    "cron_id": CronRefCondition,
    "cron_name": CronNameCondition,
    "run_time_from_to": RunTimeFromToCondition,
    "run_time_from": RunTimeFromCondition,
    "run_time_to": RunTimeToCondition,
    "limit": LimitCondition,
}


class CronResultQuery(WireModel):
    """Parsed crontab-result conditions, all ANDed."""

    ids: tuple[int, ...] = ()
    cron_ids: tuple[int, ...] = ()
    cron_names: tuple[str, ...] = ()
    run_time_from: int | None = None
    run_time_to: int | None = None
    is_success: bool = False
    is_failure: bool = False
    limit: int | None = None
    condition_count: int = 0


def parse_cron_result_query(value: Any, field: str = "query") -> CronResultQuery:
    """Parse ``{"condition": [...]}`` for crontab-result methods."""
    if not isinstance(value, dict) or set(value) != {"condition"}:
        raise InvalidParams(f'{field}: must be an object {{"condition": [...]}}')
    conditions = _parse_conditions(
        value["condition"],
        f"{field}.condition",
        _CRON_RESULT_CONDITIONS,
        _CRON_RESULT_FLAGS,
    )
    gathered = _Gathered.of(conditions)
    return CronResultQuery(
        ids=gathered.take("id"),
        cron_ids=gathered.take("cron_id"),
        cron_names=gathered.take("cron_name"),
        run_time_from=gathered.low,
        run_time_to=gathered.high,
        limit=gathered.final_limit,
        condition_count=len(value["condition"]),
        **gathered.flags,
    )


class CronResultData(TypedDict):
    """``{"condition": [...]}``: a crontab-result query on the wire."""

    condition: list[CronResultCondition]


CronResultQueryParam = Annotated[
    CronResultQuery, Parse(parse_cron_result_query, wire=CronResultData)
]
"""``{"condition": [...]}``, parsed into one CronResultQuery."""


# --------------------------------------------------------------------------- kv

KV_NAMESPACE_MAX = 128
KV_KEY_MAX = 512
KV_VALUE_MAX_BYTES = 1 << 20
KV_MULTI_MAX = 10_000
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _kv_text(value: Any, field: str, longest: int) -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"{field}: must be a string")
    if not value:
        raise InvalidInput(f"{field}: must not be empty")
    if len(value) > longest:
        raise InvalidInput(f"{field}: longer than {longest} characters")
    if _CONTROL_RE.search(value):
        raise InvalidInput(f"{field}: must not contain control characters")
    return value


def parse_kv_namespace(value: Any, field: str = "namespace") -> str:
    """A KV namespace name: 1-128 characters, no control characters."""
    return _kv_text(value, field, KV_NAMESPACE_MAX)


def parse_kv_key(value: Any, field: str = "key") -> str:
    """A KV key: 1-512 characters, no control characters and no ``*``."""
    key = _kv_text(value, field, KV_KEY_MAX)
    if "*" in key:
        raise InvalidInput(f"{field}: a key cannot contain '*'")
    return key


def parse_kv_key_pattern(value: Any, field: str = "key") -> str:
    """A KV key, or a prefix ending in one ``*`` (``metadata_*``, ``*``)."""
    pattern = _kv_text(value, field, KV_KEY_MAX)
    if "*" in pattern[:-1]:
        raise InvalidInput(f"{field}: a wildcard key has exactly one '*', at its end")
    return pattern


def parse_kv_value(value: Any, field: str = "value") -> Any:
    """Any JSON value up to 1 MiB and 32 levels deep."""
    try:
        _check_free_json(value, 1)
        size = len(orjson.dumps(value))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{field}: {exc}") from None
    if size > KV_VALUE_MAX_BYTES:
        raise InvalidInput(
            f"{field}: {size} bytes of JSON exceed the {KV_VALUE_MAX_BYTES}-byte limit"
        )
    return value


def parse_kv_namespace_keys(value: Any, field: str = "namespace_key") -> list[tuple[str, str]]:
    """``[{"namespace", "key"}, ...]`` as (namespace, key pattern) pairs; extra fields ignored."""
    if not isinstance(value, list):
        raise InvalidParams(f"{field}: must be an array of {{namespace, key}} objects")
    if len(value) > KV_MULTI_MAX:
        raise InvalidInput(f"{field}: {len(value)} items exceed the limit of {KV_MULTI_MAX}")
    pairs = []
    for index, item in enumerate(value):
        where = f"{field}.{index}"
        if not isinstance(item, dict) or "namespace" not in item or "key" not in item:
            raise InvalidParams(f"{where}: must be an object {{namespace, key}}")
        pairs.append(
            (
                parse_kv_namespace(item["namespace"], f"{where}.namespace"),
                parse_kv_key_pattern(item["key"], f"{where}.key"),
            )
        )
    return pairs


_KvNamespaceText = Annotated[str, Field(min_length=1, max_length=KV_NAMESPACE_MAX)]


class KvNamespaceKey(TypedDict):
    """``{"namespace", "key"}``: one item of kv_get_multi_value; the key may end in ``*``."""

    namespace: _KvNamespaceText
    key: Annotated[
        str,
        Field(min_length=1, max_length=KV_KEY_MAX, description="a key, or a prefix ending in '*'"),
    ]


KvNamespace = Annotated[str, Parse(parse_kv_namespace, wire=_KvNamespaceText)]
KvKey = Annotated[
    str,
    Parse(
        parse_kv_key,
        wire=Annotated[str, Field(min_length=1, max_length=KV_KEY_MAX, description="no '*'")],
    ),
]
KvValue = Annotated[
    Any,
    Parse(parse_kv_value, wire=Annotated[Any, Field(description="any JSON value, up to 1 MiB")]),
]
KvNamespaceKeys = Annotated[
    list[tuple[str, str]],
    Parse(
        parse_kv_namespace_keys,
        wire=Annotated[list[KvNamespaceKey], Field(max_length=KV_MULTI_MAX)],
    ),
]
"""(namespace, key pattern) pairs."""


# --------------------------------------------------------------------------- token limits


class AgentScope(WireModel):
    """``{"agent_uuid": "<uuid>"}``"""

    agent_uuid: str

    @field_validator("agent_uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return canonical_uuid(value)


class GlobalScope(WireModel):
    """``{"global": null}``"""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)
    global_: None = Field(alias="global")

    @model_serializer
    def _to_wire(self) -> dict[str, None]:
        return {"global": None}


class KvNamespaceScope(WireModel):
    """``{"kv_namespace": "<name>"}``: one KV namespace (only KV permissions use it)."""

    kv_namespace: str

    @field_validator("kv_namespace")
    @classmethod
    def _name(cls, value: str) -> str:
        if not 0 < len(value) <= KV_NAMESPACE_MAX or _CONTROL_RE.search(value):
            raise ValueError(f"must be 1-{KV_NAMESPACE_MAX} characters without control characters")
        return value


def _scope_tag(value: Any) -> str | None:
    if value == "global":
        return "global_name"
    if isinstance(value, GlobalScope):
        return "global"
    if isinstance(value, AgentScope | KvNamespaceScope):
        return next(iter(type(value).model_fields))
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if isinstance(key, str) else None
    return None


if TYPE_CHECKING:
    Scope = Union[Literal["global"], GlobalScope, AgentScope, KvNamespaceScope]  # noqa: UP007
else:
    Scope = Annotated[
        Union[  # noqa: UP007
            Annotated[Literal["global"], Tag("global_name")],
            Annotated[GlobalScope, Tag("global")],
            Annotated[AgentScope, Tag("agent_uuid")],
            Annotated[KvNamespaceScope, Tag("kv_namespace")],
        ],
        Discriminator(
            _scope_tag,
            custom_error_type="unknown_scope",
            custom_error_message='unknown scope; expected "global", {"global": null}, '
            '{"agent_uuid": "<uuid>"} or {"kv_namespace": "<name>"}',
        ),
    ]

_PATTERN = Annotated[str, Field(min_length=1, max_length=128)]


class TaskAction(WireModel):
    """``{"create"|"read"|"write"|"delete": "<type pattern>"}``"""

    create: _PATTERN | None = None
    read: _PATTERN | None = None
    write: _PATTERN | None = None
    delete: _PATTERN | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TaskAction:
        if sum(v is not None for v in (self.create, self.read, self.write, self.delete)) != 1:
            raise ValueError("needs exactly one of create, read, write, delete")
        return self


class TaskPermission(WireModel):
    """``{"task": "listen"}`` or ``{"task": {"create": "ping"}}``"""

    task: Literal["listen"] | TaskAction


class CrontabPermission(WireModel):
    """``{"crontab": "read"|"write"|"delete"}``"""

    crontab: Literal["read", "write", "delete"]


class CronResultAction(WireModel):
    """``{"read"|"delete": "<cron name pattern>"}``"""

    read: _PATTERN | None = None
    delete: _PATTERN | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CronResultAction:
        if (self.read is None) == (self.delete is None):
            raise ValueError("needs exactly one of read, delete")
        return self


class CronResultPermission(WireModel):
    """``{"crontab_result": {"read": "<pattern>"}}``"""

    crontab_result: CronResultAction


class TerminalPermission(WireModel):
    """``{"terminal": "connect"}``"""

    terminal: Literal["connect"]


class AgentPermission(WireModel):
    """``{"agent": "list"|"enroll"}`` (taskd extension)."""

    agent: Literal["list", "enroll"]


class TokenPermission(WireModel):
    """``{"token": "read"|"write"|"delete"}`` (taskd extension)."""

    token: Literal["read", "write", "delete"]


_KV_PATTERN = Annotated[str, Field(min_length=1, max_length=KV_KEY_MAX)]


class KvAction(WireModel):
    """``{"read"|"write"|"delete": "<key pattern>"}``"""

    read: _KV_PATTERN | None = None
    write: _KV_PATTERN | None = None
    delete: _KV_PATTERN | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> KvAction:
        if sum(v is not None for v in (self.read, self.write, self.delete)) != 1:
            raise ValueError("needs exactly one of read, write, delete")
        return self


class KvPermission(WireModel):
    """``{"kv": "list_all_namespace"|"list_all_keys"}`` or ``{"kv": {"read": "metadata_*"}}``"""

    kv: Literal["list_all_namespace", "list_all_keys"] | KvAction


class NodeGetPermission(WireModel):
    """``{"node_get": "list_all_agent_uuid"}``; NodeGet's other values parse but grant nothing."""

    node_get: Literal["list_all_agent_uuid", "delete_agent_uuid", "get_rt_pool", "exec_sql"]


class MonitoringUuidPermission(WireModel):
    """``{"monitoring_uuid": "list"|"delete"}``: list or soft-delete agent UUIDs."""

    monitoring_uuid: Literal["list", "delete"]


StaticField = Literal["cpu", "system", "gpu"]
DynamicField = Literal["cpu", "ram", "load", "system", "disk", "network", "gpu"]
_SUMMARY_FIELD = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class StaticRead(WireModel):
    """``{"read": "cpu"|"system"|"gpu"}``"""

    read: StaticField


class StaticMonitoringPermission(WireModel):
    """``{"static_monitoring": "write"|"delete"|{"read": "<field>"}}``"""

    static_monitoring: Literal["write", "delete"] | StaticRead


class DynamicRead(WireModel):
    """``{"read": "cpu"|"ram"|"load"|"system"|"disk"|"network"|"gpu"}``"""

    read: DynamicField


class DynamicMonitoringPermission(WireModel):
    """``{"dynamic_monitoring": "write"|"delete"|{"read": "<field>"}}``"""

    dynamic_monitoring: Literal["write", "delete"] | DynamicRead


class SummaryRead(WireModel):
    """``{"read": "<summary field>"}`` (taskd extension: one field of the summary)."""

    read: _SUMMARY_FIELD


class DynamicMonitoringSummaryPermission(WireModel):
    """``{"dynamic_monitoring_summary": "read"|"write"|"delete"}`` (``"read"``: every field),
    or ``{"dynamic_monitoring_summary": {"read": "<field>"}}``."""

    dynamic_monitoring_summary: Literal["read", "write", "delete"] | SummaryRead


class AlertPermission(WireModel):
    """``{"alert": "read"|"write"}`` (taskd extension: alert channels, rules and events)."""

    alert: Literal["read", "write"]


PERMISSION_KINDS: tuple[type[WireModel], ...] = (
    TaskPermission,
    CrontabPermission,
    CronResultPermission,
    TerminalPermission,
    AgentPermission,
    TokenPermission,
    KvPermission,
    NodeGetPermission,
    MonitoringUuidPermission,
    StaticMonitoringPermission,
    DynamicMonitoringPermission,
    DynamicMonitoringSummaryPermission,
    AlertPermission,
)


def _permission_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if isinstance(key, str) else None
    return None


if TYPE_CHECKING:
    Permission = Union[  # noqa: UP007
        TaskPermission,
        CrontabPermission,
        CronResultPermission,
        TerminalPermission,
        AgentPermission,
        TokenPermission,
        KvPermission,
        NodeGetPermission,
        MonitoringUuidPermission,
        StaticMonitoringPermission,
        DynamicMonitoringPermission,
        DynamicMonitoringSummaryPermission,
        AlertPermission,
    ]
else:
    # tagged by the one key, so a bad permission is reported against its own kind only
    _PERMISSION_NAMES = [next(iter(kind.model_fields)) for kind in PERMISSION_KINDS]
    Permission = Annotated[
        Union[  # noqa: UP007 - a runtime tuple of members
            tuple(
                Annotated[kind, Tag(name)]
                for kind, name in zip(PERMISSION_KINDS, _PERMISSION_NAMES, strict=True)
            )
        ],
        Discriminator(
            _permission_tag,
            custom_error_type="unknown_permission",
            custom_error_message="unknown permission; expected an object with one of the keys "
            + ", ".join(_PERMISSION_NAMES),
        ),
    ]


class Limit(WireModel):
    """One limit: the permissions hold on the scopes."""

    scopes: list[Scope] = Field(max_length=10_000)
    permissions: list[Permission] = Field(max_length=1_000)


LIMITS: TypeAdapter[list[Limit]] = TypeAdapter(list[Limit])


def parse_limits(value: Any, field: str = "limits") -> list[Limit]:
    """Parse a token's limit list."""
    return parse_as(LIMITS, field, value)


def limits_to_wire(limits: Sequence[Limit]) -> list[Any]:
    """Serialise limits back to their JSON form."""

    # each member is dumped on its own: pydantic's union serializer picks the first model
    # whose serializer accepts the value, which turned an agent scope into a global one
    def dump(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return item.model_dump(mode="json", by_alias=True, exclude_none=True)
        return item

    return [
        {
            "scopes": [dump(scope) for scope in limit.scopes],
            "permissions": [dump(permission) for permission in limit.permissions],
        }
        for limit in limits
    ]


# --------------------------------------------------------------------------- monitoring

SummaryField = Literal[
    "cpu_usage",
    "gpu_usage",
    "used_swap",
    "total_swap",
    "used_memory",
    "total_memory",
    "available_memory",
    "load_one",
    "load_five",
    "load_fifteen",
    "uptime",
    "boot_time",
    "process_count",
    "total_space",
    "available_space",
    "read_speed",
    "write_speed",
    "tcp_connections",
    "udp_connections",
    "total_received",
    "total_transmitted",
    "transmit_speed",
    "receive_speed",
]
SUMMARY_FIELDS: tuple[SummaryField, ...] = get_args(SummaryField)
"""The figures of a DynamicMonitoringSummaryData, in NodeGet's order."""
STATIC_FIELDS: tuple[StaticField, ...] = ("cpu", "system", "gpu")
DYNAMIC_FIELDS: tuple[DynamicField, ...] = (
    "cpu",
    "ram",
    "load",
    "system",
    "disk",
    "network",
    "gpu",
)


class ReportPart(BaseModel):
    """A part of a host report: the named fields are checked, other fields are kept as sent
    (taskd's agent adds some, e.g. ``system.ipv4``)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class StaticCpu(ReportPart):
    """StaticCPUData."""

    physical_cores: int
    logical_cores: int
    per_core: list[dict[str, Any]]


ReportUuid = Annotated[str, AfterValidator(canonical_uuid)]
"""The agent UUID inside a report, in canonical form."""


class StaticMonitoringData(WireModel):
    """StaticMonitoringData: what a host is; ``data_hash`` (16 bytes) tells a changed report."""

    uuid: ReportUuid
    time: int
    data_hash: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(max_length=64)]
    cpu: StaticCpu
    system: dict[str, Any]
    gpu: list[dict[str, Any]]


class DynamicCpu(ReportPart):
    """DynamicCPUData."""

    per_core: list[dict[str, Any]]
    total_cpu_usage: float


class DynamicRam(ReportPart):
    """DynamicRamData (bytes)."""

    total_memory: int
    available_memory: int
    used_memory: int
    total_swap: int
    used_swap: int


class DynamicLoad(ReportPart):
    """DynamicLoadData."""

    one: float
    five: float
    fifteen: float


class DynamicSystem(ReportPart):
    """DynamicSystemData (seconds)."""

    boot_time: int
    uptime: int
    process_count: int


class DynamicDisk(ReportPart):
    """DynamicPerDiskData (bytes, bytes/s)."""

    mount_point: str
    total_space: int
    available_space: int
    read_speed: int
    write_speed: int


class DynamicInterface(ReportPart):
    """DynamicPerNetworkInterfaceData (bytes, bytes/s)."""

    interface_name: str
    total_received: int
    total_transmitted: int
    receive_speed: int
    transmit_speed: int


class DynamicNetwork(ReportPart):
    """DynamicNetworkData."""

    interfaces: list[DynamicInterface]
    udp_connections: int
    tcp_connections: int


class DynamicMonitoringData(WireModel):
    """DynamicMonitoringData: how a host is doing, kept as sent."""

    uuid: ReportUuid
    time: int
    cpu: DynamicCpu
    ram: DynamicRam
    load: DynamicLoad
    system: DynamicSystem
    disk: list[DynamicDisk]
    network: DynamicNetwork
    gpu: list[dict[str, Any]]


class DynamicMonitoringSummaryData(WireModel):
    """DynamicMonitoringSummaryData: flat figures, each optional; ``cpu_usage`` and the
    loads are ten times the value, as integers."""

    uuid: ReportUuid
    time: int
    cpu_usage: int | None = None
    gpu_usage: int | None = None
    used_swap: int | None = None
    total_swap: int | None = None
    used_memory: int | None = None
    total_memory: int | None = None
    available_memory: int | None = None
    load_one: int | None = None
    load_five: int | None = None
    load_fifteen: int | None = None
    uptime: int | None = None
    boot_time: int | None = None
    process_count: int | None = None
    total_space: int | None = None
    available_space: int | None = None
    read_speed: int | None = None
    write_speed: int | None = None
    tcp_connections: int | None = None
    udp_connections: int | None = None
    total_received: int | None = None
    total_transmitted: int | None = None
    transmit_speed: int | None = None
    receive_speed: int | None = None


class StorageTimeFromToCondition(WireModel):
    """``{"storage_time_from_to": [a, b]}``: when the server stored the row, inclusive, ms."""

    storage_time_from_to: tuple[int, int] = Field(strict=False)


class StorageTimeFromCondition(WireModel):
    """``{"storage_time_from": a}`` inclusive, ms."""

    storage_time_from: int


class StorageTimeToCondition(WireModel):
    """``{"storage_time_to": b}`` inclusive, ms."""

    storage_time_to: int


MonitoringCondition = TypeAliasType(
    "MonitoringCondition",
    Union[  # noqa: UP007
        Literal["last"],
        Annotated[dict[str, None], WithJsonSchema(_null_form("last"))],
        UuidCondition,
        TimestampFromToCondition,
        TimestampFromCondition,
        TimestampToCondition,
        StorageTimeFromToCondition,
        StorageTimeFromCondition,
        StorageTimeToCondition,
        LimitCondition,
    ],
)
"""One QueryCondition of a monitoring query or delete (schema only: parsed by
parse_monitoring_conditions)."""
_MONITORING_CONDITIONS: dict[str, type[WireModel]] = {
    "uuid": UuidCondition,
    "timestamp_from_to": TimestampFromToCondition,
    "timestamp_from": TimestampFromCondition,
    "timestamp_to": TimestampToCondition,
    "storage_time_from_to": StorageTimeFromToCondition,
    "storage_time_from": StorageTimeFromCondition,
    "storage_time_to": StorageTimeToCondition,
    "limit": LimitCondition,
}
MAX_MONITORING_ROWS = 10_000
"""The default and largest number of rows a monitoring query answers (NodeGet's)."""
if TYPE_CHECKING:
    Points = list[dict[str, Any]] | orjson.Fragment
else:
    Points = Annotated[
        Any,
        WithJsonSchema(
            {"type": "array", "items": {"type": "object", "additionalProperties": True}}
        ),
    ]
"""A query's answer: points as objects, or their JSON array encoded already."""


class MonitoringWindow(WireModel):
    """Parsed monitoring conditions, all ANDed: the rows a query or delete is about.

    With a ``limit`` (``last`` is 1) the newest rows are chosen, newest first;
    otherwise rows come oldest first.
    """

    uuids: tuple[str, ...] = ()
    time_from: int | None = None
    time_to: int | None = None
    storage_from: int | None = None
    storage_to: int | None = None
    limit: int | None = None
    condition_count: int = 0


def parse_monitoring_conditions(value: Any, field: str = "condition") -> MonitoringWindow:
    """Parse a monitoring QueryCondition list into one MonitoringWindow."""
    parsed = _parse_conditions(value, field, _MONITORING_CONDITIONS, ("last",))
    storage = _Gathered.of(
        [c for c in parsed if isinstance(c, WireModel) and _is_storage_condition(c)]
    )
    other = _Gathered.of(
        [c for c in parsed if not isinstance(c, WireModel) or not _is_storage_condition(c)]
    )
    return MonitoringWindow(
        uuids=tuple(dict.fromkeys(other.take("uuid"))),
        time_from=other.low,
        time_to=other.high,
        storage_from=storage.low,
        storage_to=storage.high,
        limit=other.final_limit,
        condition_count=len(value),
    )


def _is_storage_condition(condition: WireModel) -> bool:
    return isinstance(
        condition,
        StorageTimeFromToCondition | StorageTimeFromCondition | StorageTimeToCondition,
    )


MonitoringConditions = Annotated[
    MonitoringWindow,
    Parse(parse_monitoring_conditions, wire=list[MonitoringCondition]),
]
"""A bare monitoring condition list, parsed into one MonitoringWindow."""


Resolution = Literal["raw", "1m", "1h", "auto"]
"""Where summaries are read from: raw rows, 1-minute or 1-hour rollups, or ``auto``: the
finest one giving at most about ``AUTO_POINTS`` points over the range asked."""
_RESOLUTION = TypeAdapter(Resolution)


@dataclass(frozen=True)
class MonitoringQuery:
    """A parsed ``{fields, condition}`` (and a summary's ``resolution``): the fields asked
    (in order, once each) and the rows."""

    fields: tuple[str, ...]
    window: MonitoringWindow
    resolution: Resolution = "raw"


_STATIC_FIELDS_ADAPTER = TypeAdapter(list[StaticField])
_DYNAMIC_FIELDS_ADAPTER = TypeAdapter(list[DynamicField])
_SUMMARY_FIELDS_ADAPTER = TypeAdapter(list[SummaryField])


def _monitoring_query(adapter: TypeAdapter[list[Any]], summary: bool = False) -> Parser:
    keys = {"fields", "condition", "resolution"} if summary else {"fields", "condition"}

    def parse(value: Any, field: str) -> MonitoringQuery:
        if not isinstance(value, dict) or not set(value) <= keys:
            raise InvalidParams(
                f"{field}: must be an object with {', '.join(sorted(keys))} (unknown: "
                f"{', '.join(sorted(set(value) - keys)) if isinstance(value, dict) else '-'})"
            )
        fields = parse_as(adapter, f"{field}.fields", value.get("fields", []))
        window = parse_monitoring_conditions(value.get("condition", []), f"{field}.condition")
        resolution = parse_as(_RESOLUTION, f"{field}.resolution", value.get("resolution", "raw"))
        return MonitoringQuery(tuple(dict.fromkeys(fields)), window, resolution)

    return parse


class StaticDataQuery(TypedDict):
    """``{"fields": [...], "condition": [...]}`` of agent_query_static."""

    fields: list[StaticField]
    condition: list[MonitoringCondition]


class DynamicDataQuery(TypedDict):
    """``{"fields": [...], "condition": [...]}`` of agent_query_dynamic."""

    fields: list[DynamicField]
    condition: list[MonitoringCondition]


class DynamicSummaryQuery(TypedDict):
    """``{"fields": [...], "condition": [...], "resolution": ...}`` of
    agent_query_dynamic_summary (no fields: every field; resolution: taskd's, ``raw`` by
    default)."""

    fields: list[SummaryField]
    condition: list[MonitoringCondition]
    resolution: NotRequired[Resolution]


StaticQueryParam = Annotated[
    MonitoringQuery, Parse(_monitoring_query(_STATIC_FIELDS_ADAPTER), wire=StaticDataQuery)
]
DynamicQueryParam = Annotated[
    MonitoringQuery, Parse(_monitoring_query(_DYNAMIC_FIELDS_ADAPTER), wire=DynamicDataQuery)
]
SummaryQueryParam = Annotated[
    MonitoringQuery,
    Parse(_monitoring_query(_SUMMARY_FIELDS_ADAPTER, summary=True), wire=DynamicSummaryQuery),
]
