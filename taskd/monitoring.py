"""Host monitoring retention: how long old reports and rollups are kept.

The pruning loop (retention.py) deletes, agent by agent, the rows older than their
table's retention (server settings ``monitoring_*_retention_s``), in small chunks. An
agent's newest static report is kept whatever its age (it says what the host is).

Defaults (per agent reporting every second; sizes measured by benchmark P9, which holds
1,000 agents for a year within 20 GB on PostgreSQL, the larger of the two databases):
raw dynamic reports 30 min (a few KB each: recent detail only), raw summaries 4 h (the
dashboard's 1-hour view at full detail, with room to look back), 1-minute rollups 2 days
(the 24-hour view at a point a minute; ``auto`` reads them for windows that start
within them and are too wide or too old for raw rows), 1-hour rollups and static
reports 400 days (a year of charts and host history).
"""

from __future__ import annotations

from typing import Literal

from taskd.config import ServerSettings

Pruned = Literal["dynamic", "summary", "static", "1m", "1h"]


def retentions(settings: ServerSettings) -> dict[Pruned, int]:
    """How long each kind of row is kept, in ms."""
    return {
        "dynamic": settings.monitoring_dynamic_retention_s * 1000,
        "summary": settings.monitoring_summary_retention_s * 1000,
        "1m": settings.monitoring_rollup_1m_retention_s * 1000,
        "1h": settings.monitoring_rollup_1h_retention_s * 1000,
        "static": settings.monitoring_static_retention_s * 1000,
    }
