"""dynamic_monitoring_summary_latest.point: each agent's newest summary as its JSON point

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision: the column, empty (the next summary of each agent fills it)."""
    op.add_column("dynamic_monitoring_summary_latest", sa.Column("point", sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    op.drop_column("dynamic_monitoring_summary_latest", "point")
