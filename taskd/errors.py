"""Exceptions, each carrying its JSON-RPC error code.

One place (``taskd.rpc``) turns them into error responses::

    TaskdError (999)
    ├── InvalidRequest (-32600)
    ├── MethodNotFound (-32601)
    ├── InvalidParams (-32602)
    ├── InternalError (-32603)
    ├── SerializationError (101)        cannot parse or serialise a value
    │   └── InvalidCronExpression
    ├── PermissionDenied (102)          bad credentials or missing permission
    ├── DatabaseError (103)
    ├── AgentNotConnected (104)
    ├── NotFound (105)                  no such task / cron / token
    ├── UuidNotFound (106)
    ├── ConfigNotFound (107)
    ├── InvalidInput (108)              well-formed but not acceptable
    │   └── AlreadyUploaded
    └── TaskTimeout (999)
"""

from __future__ import annotations

from typing import Any


class TaskdError(Exception):
    """Base of every error answered to a client; ``code`` is the JSON-RPC error code."""

    code: int = 999

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this exception."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class InvalidRequest(TaskdError):
    """The message is JSON but not a JSON-RPC 2.0 request."""

    code = -32600


class MethodNotFound(TaskdError):
    """No method has that name."""

    code = -32601


class InvalidParams(TaskdError):
    """Params are missing, extra or of the wrong type; the message names the field."""

    code = -32602


class InternalError(TaskdError):
    """An unexpected failure inside the server; details are logged, never sent."""

    code = -32603


class SerializationError(TaskdError):
    """A value cannot be parsed or serialised."""

    code = 101


class InvalidCronExpression(SerializationError):
    """A cron expression is not valid."""


class PermissionDenied(TaskdError):
    """Bad credentials, or the token lacks the permission."""

    code = 102


class DatabaseError(TaskdError):
    """The database failed or is unreachable."""

    code = 103


class AgentNotConnected(TaskdError):
    """The target agent holds no subscription."""

    code = 104


class NotFound(TaskdError):
    """The referenced task, cron or token does not exist."""

    code = 105


class UuidNotFound(TaskdError):
    """The referenced agent UUID is unknown."""

    code = 106


class ConfigNotFound(TaskdError):
    """A configuration file or entry is missing."""

    code = 107


class InvalidInput(TaskdError):
    """The input is well-formed but not acceptable."""

    code = 108


class AlreadyUploaded(InvalidInput):
    """A result was already stored for that task."""


class TaskTimeout(TaskdError):
    """A blocking call did not get its result in time."""

    code = 999
