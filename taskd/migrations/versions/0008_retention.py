"""cron.result_retention_ms: how long a cron's result rows are kept

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("cron", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_retention_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("cron", schema=None) as batch_op:
        batch_op.drop_column("result_retention_ms")
