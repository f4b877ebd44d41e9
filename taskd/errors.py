"""Exceptions, each carrying its JSON-RPC error code.

One place (``taskd.rpc``) turns them into error responses, whose message is
NodeGet's prefix for the code followed by the exception's own sentence::

    TaskdError (999)                    "Other error: "
    ├── InvalidRequest (-32600)
    ├── MethodNotFound (-32601)
    ├── InvalidParams (-32602)
    ├── InternalError (-32603)
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

from typing import Any, ClassVar


class TaskdError(Exception):
    """Base of every error answered to a client; ``code`` is the JSON-RPC error code."""

    code: ClassVar[int] = 999
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


class InvalidRequest(TaskdError):
    """The message is JSON but not a JSON-RPC 2.0 request."""

    code: ClassVar[int] = -32600
    prefix: ClassVar[str] = ""


class MethodNotFound(TaskdError):
    """No method has that name."""

    code: ClassVar[int] = -32601
    prefix: ClassVar[str] = ""


class InvalidParams(TaskdError):
    """Params are missing, extra or of the wrong type; the message names the field."""

    code: ClassVar[int] = -32602
    prefix: ClassVar[str] = ""


class InternalError(TaskdError):
    """An unexpected failure inside the server; details are logged, never sent."""

    code: ClassVar[int] = -32603
    prefix: ClassVar[str] = ""


class SerializationError(TaskdError):
    """A value cannot be parsed or serialised."""

    code: ClassVar[int] = 101
    prefix: ClassVar[str] = "Parse error: "


class InvalidCronExpression(SerializationError):
    """A cron expression is not valid."""


class PermissionDenied(TaskdError):
    """Bad credentials, or the token lacks the permission."""

    code: ClassVar[int] = 102
    prefix: ClassVar[str] = "Permission denied: "


class DatabaseError(TaskdError):
    """The database failed or is unreachable."""

    code: ClassVar[int] = 103
    prefix: ClassVar[str] = "Database error: "


class AgentNotConnected(TaskdError):
    """The target agent holds no subscription."""

    code: ClassVar[int] = 104
    prefix: ClassVar[str] = "Unable to connect agent: "


class NotFound(TaskdError):
    """The referenced task, cron or token does not exist."""

    code: ClassVar[int] = 105
    prefix: ClassVar[str] = "Not found in database: "


class UuidNotFound(TaskdError):
    """The referenced agent UUID is unknown."""

    code: ClassVar[int] = 106
    prefix: ClassVar[str] = "UUID not found: "


class ConfigNotFound(TaskdError):
    """A configuration file or entry is missing."""

    code: ClassVar[int] = 107
    prefix: ClassVar[str] = "Config not found: "


class InvalidInput(TaskdError):
    """The input is well-formed but not acceptable."""

    code: ClassVar[int] = 108
    prefix: ClassVar[str] = "Invalid input: "


class AlreadyUploaded(InvalidInput):
    """A result was already stored for that task."""


class TaskTimeout(TaskdError):
    """A blocking call did not get its result in time."""

    code: ClassVar[int] = 999
