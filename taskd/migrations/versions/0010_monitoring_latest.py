"""dynamic_monitoring_summary_latest: each agent's newest summary, kept on write

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

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
    """Apply this revision: the table, filled from the summaries stored so far."""
    op.create_table(
        "dynamic_monitoring_summary_latest",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("time", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("storage_time", sa.BigInteger(), nullable=False),
        *(sa.Column(name, kind(), nullable=True) for name, kind in SUMMARY_COLUMNS),
        sa.PrimaryKeyConstraint("uuid"),
    )
    names = ", ".join(["uuid", "time", "storage_time", *(name for name, _ in SUMMARY_COLUMNS)])
    op.execute(
        f"INSERT INTO dynamic_monitoring_summary_latest ({names}) "
        f"SELECT {names} FROM dynamic_monitoring_summary AS s WHERE s.time = "
        "(SELECT max(n.time) FROM dynamic_monitoring_summary AS n WHERE n.uuid = s.uuid)"
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("dynamic_monitoring_summary_latest")
