"""The error codes and the exception tree, each exception carrying its code.

One place (``taskd.rpc.failure``) turns an exception into an error reply, whose
message is NodeGet's prefix for the code followed by the exception's own sentence::

    TaskdError (999)                    "Other error: "
    ├── ParseError (-32700)
    ├── InvalidRequest (-32600)
    ├── MethodNotFound (-32601)
    ├── InvalidParams (-32602)
    ├── InternalError (-32603)
    ├── ServerBusy (-32000)             report not stored: send again after ``data.retry_after_ms``
    ├── SerializationError (101)        "Parse error: "  cannot parse or serialise a value
    │   └── InvalidCronExpression
    ├── PermissionDenied (102)          "Permission denied: "  bad credentials or missing permission
    ├── DatabaseError (103)             "Database error: "
    ├── AgentNotConnected (104)         "Unable to connect agent: "
    ├── NotFound (105)                  "Not found in database: "  no such task / cron / token
    ├── UuidNotFound (106)              "UUID not found: "
    ├── ConfigNotFound (107)            "Config not found: "
    ├── InvalidInput (108)              "Invalid input: "  well-formed but not acceptable
    │   └── AlreadyUploaded
    └── TaskTimeout (999)               "Other error: "

The standard JSON-RPC codes (negative) carry no prefix.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class ErrorCode(IntEnum):
    """Every JSON-RPC error code taskd answers: the standard ones, then NodeGet's."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    SERVER_BUSY = -32000
    SERIALIZATION = 101
    PERMISSION_DENIED = 102
    DATABASE = 103
    AGENT_NOT_CONNECTED = 104
    NOT_FOUND = 105
    UUID_NOT_FOUND = 106
    CONFIG_NOT_FOUND = 107
    INVALID_INPUT = 108
    OTHER = 999


class TaskdError(Exception):
    """Base of every error answered to a client; ``code`` is the JSON-RPC error code."""

    code: ClassVar[ErrorCode] = ErrorCode.OTHER
    prefix: ClassVar[str] = "Other error: "
    """NodeGet's wording for the code, which its clients match on."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    @property
    def wire_message(self) -> str:
        """The message as answered: the code's prefix (once), then the sentence."""
        if self.message.startswith(self.prefix):
            return self.message
        return self.prefix + self.message

    def to_error(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this exception."""
        error: dict[str, Any] = {"code": self.code, "message": self.wire_message}
        if self.data is not None:
            error["data"] = self.data
        return error


class ParseError(TaskdError):
    """The message is not JSON."""

    code: ClassVar[ErrorCode] = ErrorCode.PARSE_ERROR
    prefix: ClassVar[str] = ""


class InvalidRequest(TaskdError):
    """The message is JSON but not a JSON-RPC 2.0 request."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_REQUEST
    prefix: ClassVar[str] = ""


class MethodNotFound(TaskdError):
    """No method has that name."""

    code: ClassVar[ErrorCode] = ErrorCode.METHOD_NOT_FOUND
    prefix: ClassVar[str] = ""


class InvalidParams(TaskdError):
    """Params are missing, extra or of the wrong type; the message names the field."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_PARAMS
    prefix: ClassVar[str] = ""


class InternalError(TaskdError):
    """An unexpected failure inside the server; details are logged, never sent."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    prefix: ClassVar[str] = ""


class ServerBusy(TaskdError):
    """A report came while the server is busy (an agent's buffered backlog while a crowd
    of agents comes in, or any report beyond its connection's window of calls in
    progress): it was not stored, and the agent keeps it and sends it again after
    ``retry_after_ms`` (a JSON-RPC server error, taskd extension)."""

    code: ClassVar[ErrorCode] = ErrorCode.SERVER_BUSY
    prefix: ClassVar[str] = ""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            f"Server busy: report not stored; send it again in {retry_after_ms} ms",
            {"retry_after_ms": retry_after_ms},
        )


class SerializationError(TaskdError):
    """A value cannot be parsed or serialised."""

    code: ClassVar[ErrorCode] = ErrorCode.SERIALIZATION
    prefix: ClassVar[str] = "Parse error: "


class InvalidCronExpression(SerializationError):
    """A cron expression is not valid."""


class PermissionDenied(TaskdError):
    """Bad credentials, or the token lacks the permission."""

    code: ClassVar[ErrorCode] = ErrorCode.PERMISSION_DENIED
    prefix: ClassVar[str] = "Permission denied: "


class DatabaseError(TaskdError):
    """The database failed or is unreachable."""

    code: ClassVar[ErrorCode] = ErrorCode.DATABASE
    prefix: ClassVar[str] = "Database error: "


class AgentNotConnected(TaskdError):
    """The target agent holds no subscription."""

    code: ClassVar[ErrorCode] = ErrorCode.AGENT_NOT_CONNECTED
    prefix: ClassVar[str] = "Unable to connect agent: "


class NotFound(TaskdError):
    """The referenced task, cron or token does not exist."""

    code: ClassVar[ErrorCode] = ErrorCode.NOT_FOUND
    prefix: ClassVar[str] = "Not found in database: "


class UuidNotFound(TaskdError):
    """The referenced agent UUID is unknown."""

    code: ClassVar[ErrorCode] = ErrorCode.UUID_NOT_FOUND
    prefix: ClassVar[str] = "UUID not found: "


class ConfigNotFound(TaskdError):
    """A configuration file or entry is missing."""

    code: ClassVar[ErrorCode] = ErrorCode.CONFIG_NOT_FOUND
    prefix: ClassVar[str] = "Config not found: "


class InvalidInput(TaskdError):
    """The input is well-formed but not acceptable."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_INPUT
    prefix: ClassVar[str] = "Invalid input: "


class AlreadyUploaded(InvalidInput):
    """A result was already stored for that task."""


class TaskTimeout(TaskdError):
    """A blocking call did not get its result in time."""

    code: ClassVar[ErrorCode] = ErrorCode.OTHER
