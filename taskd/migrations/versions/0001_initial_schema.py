"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "agent",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("connected_since", sa.BigInteger(), nullable=True),
        sa.Column("remote_addr", sa.String(length=128), nullable=True),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("token_key", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_table(
        "cron",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("enable", sa.Boolean(), nullable=False),
        sa.Column("cron_expression", sa.String(length=256), nullable=False),
        sa.Column(
            "cron_type",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("task_type", sa.String(length=16), nullable=False),
        sa.Column("queue_ttl_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_run_time", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "cron_fire",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("cron_id", sa.BigInteger(), nullable=False),
        sa.Column("slot", sa.BigInteger(), nullable=False),
        sa.Column("fired_at", sa.BigInteger(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cron_id", "slot", name="uq_cron_fire_slot"),
    )
    op.create_table(
        "cron_result",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("cron_id", sa.BigInteger(), nullable=False),
        sa.Column("cron_name", sa.String(length=128), nullable=False),
        sa.Column("run_time", sa.BigInteger(), nullable=False),
        sa.Column("agent_uuid", sa.String(length=36), nullable=True),
        sa.Column("relative_id", sa.BigInteger(), nullable=True),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("cron_result", schema=None) as batch_op:
        batch_op.create_index(
            "ix_cron_result_cron_run", ["cron_id", "run_time", "id"], unique=False
        )
        batch_op.create_index(
            "ix_cron_result_name_run", ["cron_name", "run_time", "id"], unique=False
        )
        batch_op.create_index("ix_cron_result_run", ["run_time", "id"], unique=False)

    op.create_table(
        "node",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "task",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("task_token", sa.String(length=16), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column(
            "task_event_type",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("deadline", sa.BigInteger(), nullable=False),
        sa.Column("queue_ttl_ms", sa.BigInteger(), nullable=True),
        sa.Column("order_ts", sa.BigInteger(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=True),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "task_event_result",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("cron_source", sa.String(length=128), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.create_index("ix_task_cron_order", ["cron_source", "order_ts", "id"], unique=False)
        batch_op.create_index(
            "ix_task_open_deadline",
            ["deadline"],
            unique=False,
            sqlite_where=sa.text("state < 2"),
            postgresql_where=sa.text("state < 2"),
        )
        batch_op.create_index("ix_task_order", ["order_ts", "id"], unique=False)
        batch_op.create_index(
            "ix_task_queued_uuid",
            ["uuid"],
            unique=False,
            sqlite_where=sa.text("state = 0"),
            postgresql_where=sa.text("state = 0"),
        )
        batch_op.create_index("ix_task_uuid_order", ["uuid", "order_ts", "id"], unique=False)
        batch_op.create_index(
            "ix_task_uuid_type_order", ["uuid", "type", "order_ts", "id"], unique=False
        )

    op.create_table(
        "token",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=128), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=True),
        sa.Column("password_hash", sa.String(length=256), nullable=True),
        sa.Column("is_super", sa.Boolean(), nullable=False),
        sa.Column(
            "limits",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("timestamp_from", sa.BigInteger(), nullable=True),
        sa.Column("timestamp_to", sa.BigInteger(), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
        sa.UniqueConstraint("username"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("token")
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_index("ix_task_uuid_type_order")
        batch_op.drop_index("ix_task_uuid_order")
        batch_op.drop_index(
            "ix_task_queued_uuid",
            sqlite_where=sa.text("state = 0"),
            postgresql_where=sa.text("state = 0"),
        )
        batch_op.drop_index("ix_task_order")
        batch_op.drop_index(
            "ix_task_open_deadline",
            sqlite_where=sa.text("state < 2"),
            postgresql_where=sa.text("state < 2"),
        )
        batch_op.drop_index("ix_task_cron_order")

    op.drop_table("task")
    op.drop_table("node")
    with op.batch_alter_table("cron_result", schema=None) as batch_op:
        batch_op.drop_index("ix_cron_result_run")
        batch_op.drop_index("ix_cron_result_name_run")
        batch_op.drop_index("ix_cron_result_cron_run")

    op.drop_table("cron_result")
    op.drop_table("cron_fire")
    op.drop_table("cron")
    op.drop_table("agent")
