"""The task rows the store takes and hands back (results go out as ``TaskEventResponse``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from taskd.models import TaskState


@dataclass
class NewTask:
    """A task row to insert; ``id`` is filled in once it is committed.

    Fields named like a column of ``task`` are that column's value (``order_ts``
    starts as ``created_at``); ``route_to`` is the node to notify instead.
    """

    uuid: str
    task_token: str
    type: str
    task_event_type: Any
    deadline: int
    created_at: int
    state: int = TaskState.RUNNING
    queue_ttl_ms: int | None = None
    cron_source: str | None = None
    created_by: str | None = None
    route_to: str | None = None
    waiter_node: str | None = None
    id: int = 0


class QueuedTask(NamedTuple):
    """A queued task handed to its agent's node for delivery."""

    id: int
    task_token: str
    task_event_type: Any
