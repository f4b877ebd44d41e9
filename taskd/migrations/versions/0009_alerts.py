"""alert_channel, alert_rule, alert_event, alert_delivery: alerts and their outbox

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True)


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "alert_channel",
        _id(),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "alert_rule",
        _id(),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("targets", JSON, nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("channels", JSON, nullable=False),
        sa.Column("enable", sa.Boolean(), nullable=False),
        sa.Column("remind_ms", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "alert_event",
        _id(),
        sa.Column("rule_id", sa.BigInteger(), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("resolved_at", sa.BigInteger(), nullable=True),
        sa.Column("reminded_at", sa.BigInteger(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("open_key", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("open_key"),
    )
    op.create_index("ix_alert_event_started", "alert_event", ["started_at", "id"])
    op.create_index("ix_alert_event_rule_started", "alert_event", ["rule", "started_at"])
    op.create_index("ix_alert_event_uuid_started", "alert_event", ["uuid", "started_at"])
    op.create_table(
        "alert_delivery",
        _id(),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("channel", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("next_at", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_at", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_until", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alert_delivery_due", "alert_delivery", ["state", "next_at"])
    op.create_index("ix_alert_delivery_event", "alert_delivery", ["event_id"])


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_alert_delivery_event", table_name="alert_delivery")
    op.drop_index("ix_alert_delivery_due", table_name="alert_delivery")
    op.drop_table("alert_delivery")
    op.drop_index("ix_alert_event_uuid_started", table_name="alert_event")
    op.drop_index("ix_alert_event_rule_started", table_name="alert_event")
    op.drop_index("ix_alert_event_started", table_name="alert_event")
    op.drop_table("alert_event")
    op.drop_table("alert_rule")
    op.drop_table("alert_channel")
