"""cron_fire.pending: a claimed fire whose result rows are not stored yet

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    # fires recorded before this revision all have their result rows: NULL (settled)
    with op.batch_alter_table("cron_fire", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "pending",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.create_index(
            "ix_cron_fire_pending",
            ["id"],
            unique=False,
            sqlite_where=sa.text("pending IS NOT NULL"),
            postgresql_where=sa.text("pending IS NOT NULL"),
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("cron_fire", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_cron_fire_pending",
            sqlite_where=sa.text("pending IS NOT NULL"),
            postgresql_where=sa.text("pending IS NOT NULL"),
        )
        batch_op.drop_column("pending")
