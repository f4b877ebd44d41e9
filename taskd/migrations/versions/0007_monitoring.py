"""static_monitoring, dynamic_monitoring, dynamic_monitoring_summary(_rollup): host reports

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

SUMMARY_COLUMNS: list[tuple[str, type[sa.types.TypeEngine[int]]]] = [
    ("cpu_usage", sa.SmallInteger),
    ("gpu_usage", sa.SmallInteger),
    ("used_swap", sa.BigInteger),
    ("total_swap", sa.BigInteger),
    ("used_memory", sa.BigInteger),
    ("total_memory", sa.BigInteger),
    ("available_memory", sa.BigInteger),
    ("load_one", sa.SmallInteger),
    ("load_five", sa.SmallInteger),
    ("load_fifteen", sa.SmallInteger),
    ("uptime", sa.Integer),
    ("boot_time", sa.BigInteger),
    ("process_count", sa.Integer),
    ("total_space", sa.BigInteger),
    ("available_space", sa.BigInteger),
    ("read_speed", sa.BigInteger),
    ("write_speed", sa.BigInteger),
    ("tcp_connections", sa.Integer),
    ("udp_connections", sa.Integer),
    ("total_received", sa.BigInteger),
    ("total_transmitted", sa.BigInteger),
    ("transmit_speed", sa.BigInteger),
    ("receive_speed", sa.BigInteger),
]


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "static_monitoring",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("storage_time", sa.BigInteger(), nullable=False),
        sa.Column("data_hash", sa.String(length=64), nullable=False),
        sa.Column("cpu", JSON, nullable=False),
        sa.Column("system", JSON, nullable=False),
        sa.Column("gpu", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_static_monitoring_uuid_time", "static_monitoring", ["uuid", "time"])
    op.create_table(
        "dynamic_monitoring",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("time", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("storage_time", sa.BigInteger(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.PrimaryKeyConstraint("uuid", "time"),
    )
    op.create_table(
        "dynamic_monitoring_summary",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("time", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("storage_time", sa.BigInteger(), nullable=False),
        *(sa.Column(name, kind(), nullable=True) for name, kind in SUMMARY_COLUMNS),
        sa.PrimaryKeyConstraint("uuid", "time"),
    )
    parts = {"count": sa.Integer, "sum": sa.Float, "min": sa.BigInteger, "max": sa.BigInteger}
    op.create_table(
        "dynamic_monitoring_summary_rollup",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("resolution", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bucket", sa.BigInteger(), autoincrement=False, nullable=False),
        *(
            sa.Column(f"{name}_{part}", kind(), nullable=part != "count")
            for name, _ in SUMMARY_COLUMNS
            for part, kind in parts.items()
        ),
        sa.PrimaryKeyConstraint("uuid", "resolution", "bucket"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("dynamic_monitoring_summary_rollup")
    op.drop_table("dynamic_monitoring_summary")
    op.drop_table("dynamic_monitoring")
    op.drop_index("ix_static_monitoring_uuid_time", table_name="static_monitoring")
    op.drop_table("static_monitoring")
