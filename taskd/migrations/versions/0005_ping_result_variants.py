"""task: tcp_ping and http_ping results stored under their own variant, not "ping"

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Results of these task types were stored as {"ping": x} before this revision.
_TYPES = "('tcp_ping', 'http_ping')"


def _rename(old: str, new: str | None) -> None:
    """Rewrite {old: x} to {new: x} (new None: the task's own type) for the ping-like tasks."""
    if op.get_bind().dialect.name == "postgresql":
        key = "type" if new is None else f"'{new}'"
        op.execute(
            sa.text(
                f"UPDATE task SET task_event_result = jsonb_build_object({key}, "
                f"task_event_result -> '{old}') "
                f"WHERE type IN {_TYPES} AND jsonb_typeof(task_event_result) = 'object' "
                f"AND jsonb_typeof(task_event_result -> '{old}') = 'number'"
            )
        )
    else:
        key = "type" if new is None else f"'{new}'"
        op.execute(
            sa.text(
                f"UPDATE task SET task_event_result = json_object({key}, "
                f"json_extract(task_event_result, '$.{old}')) "
                f"WHERE type IN {_TYPES} AND json_valid(task_event_result) "
                f"AND json_type(task_event_result) = 'object' "
                f"AND json_type(task_event_result, '$.{old}') IN ('integer', 'real')"
            )
        )


def upgrade() -> None:
    """Apply this revision."""
    _rename("ping", None)


def downgrade() -> None:
    """Revert this revision."""
    for name in ("tcp_ping", "http_ping"):
        _rename(name, "ping")
