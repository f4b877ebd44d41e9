"""task: indexes for queries by type alone and for running tasks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.create_index("ix_task_type_order", ["type", "order_ts", "id"], unique=False)
        batch_op.create_index(
            "ix_task_open_order",
            ["order_ts", "id"],
            unique=False,
            sqlite_where=sa.text("state < 2"),
            postgresql_where=sa.text("state < 2"),
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_task_open_order",
            sqlite_where=sa.text("state < 2"),
            postgresql_where=sa.text("state < 2"),
        )
        batch_op.drop_index("ix_task_type_order")
