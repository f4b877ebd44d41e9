"""The exception tree: every error carries a code of the enum and NodeGet's prefix once."""

from __future__ import annotations

from taskd import errors
from taskd.errors import ErrorCode, NotFound, TaskdError


def _tree(cls: type[TaskdError]) -> list[type[TaskdError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


def test_every_error_answers_with_a_code_of_the_enum() -> None:
    """Each exception class, the standard JSON-RPC ones included, carries an ErrorCode member."""
    classes = _tree(TaskdError)
    assert {errors.ParseError, errors.InvalidRequest, errors.MethodNotFound} <= set(classes)
    for cls in classes:
        assert isinstance(cls.code, ErrorCode), cls
    assert errors.InvalidParams.code == -32602 and errors.PermissionDenied.code == 102


def test_the_error_member_has_the_prefix_once_and_data_only_when_given() -> None:
    """``to_error`` prefixes the sentence with the code's wording once and omits absent data."""
    assert NotFound("No task 5").to_error() == {
        "code": 105,
        "message": "Not found in database: No task 5",
    }
    assert NotFound("Not found in database: No task 5").to_error()["message"] == (
        "Not found in database: No task 5"
    )
    assert errors.InvalidParams("x: bad", data=[1]).to_error() == {
        "code": -32602,
        "message": "x: bad",
        "data": [1],
    }
