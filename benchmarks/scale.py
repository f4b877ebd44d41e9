"""How much a run does: one scale for the benchmarks and the fault suite, full or quick.

``make bench`` and ``make faults`` run at ``FULL``; ``make bench-quick``,
``python -m benchmarks.faults --quick`` and the tests run at ``QUICK``, whose
figures are about the harness working, not about the targets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scale:
    """How much of each benchmark (P*) and fault scenario (R*) a run does."""

    name: str
    enforce_targets: bool
    """Whether fault scenarios are held to their timing targets, not only their invariants."""
    # the benchmarks
    http_seconds: float
    http_rounds: int
    http_connections: int
    ws_seconds: float
    p2_tasks: int
    p2_agents: int
    p2_callers: int
    celery_tasks: int
    celery_calls: int
    p3_calls: int
    agent_calls: int
    p4_agents: int
    p4_processes: int
    p5_rows: int
    p5_calls: int
    p6_idle_fires: int
    p6_load_seconds: float
    p7_agents: int
    """Load agents reporting a summary every second to one server (P7)."""
    p7_processes: int
    p7_seconds: float
    """How long P7 measures, once every agent reports."""
    p7_step_seconds: float
    """How long each smaller fleet is measured when the full one is more than a node holds."""
    p7_steps: int
    """At most this many smaller fleets per setup (one node, two nodes)."""
    p8_agents: int
    """Agents with summaries for the multi-last query (P8)."""
    p8_rows_per_agent: int
    p8_calls: int
    # the fault suite
    r1_tasks: int
    r1_agents: int
    r1_kills: int
    r1_window: int
    r1_deadline_ms: int
    r1_databases: tuple[str, ...]
    r2_variants: tuple[str, ...]
    r3_agents: int
    r3_processes: int
    r4_inputs: int
    r4_databases: tuple[str, ...]
    r4_slow_clients: int
    r4_slow_readers: int
    r6_outage_s: float
    r6_agents: int


FULL = Scale(
    name="full",
    enforce_targets=True,
    http_seconds=5,
    http_rounds=2,
    http_connections=100,
    ws_seconds=5,
    p2_tasks=30_000,
    p2_agents=100,
    p2_callers=4,
    celery_tasks=5_000,
    celery_calls=500,
    p3_calls=2_000,
    agent_calls=300,
    p4_agents=10_000,
    p4_processes=4,
    p5_rows=1_000_000,
    p5_calls=500,
    p6_idle_fires=30,
    p6_load_seconds=20,
    p7_agents=10_000,
    p7_processes=4,
    p7_seconds=60,
    p7_step_seconds=20,
    p7_steps=2,
    p8_agents=10_000,
    p8_rows_per_agent=60,
    p8_calls=50,
    r1_tasks=20_000,
    r1_agents=4,
    r1_kills=2,
    r1_window=400,
    r1_deadline_ms=20_000,
    r1_databases=("sqlite", "postgresql"),
    r2_variants=("cut-mid-task", "reply-lost", "blackhole"),
    r3_agents=10_000,
    r3_processes=4,
    r4_inputs=100_000,
    r4_databases=("sqlite", "postgresql"),
    r4_slow_clients=1_000,
    r4_slow_readers=4,
    r6_outage_s=8.0,
    r6_agents=20,
)
QUICK = replace(
    FULL,
    name="quick",
    enforce_targets=False,
    http_seconds=2,
    http_rounds=1,
    http_connections=32,
    ws_seconds=1,
    p2_tasks=2_000,
    celery_tasks=300,
    celery_calls=50,
    p3_calls=200,
    agent_calls=30,
    p4_agents=600,
    p4_processes=2,
    p5_rows=100_000,
    p5_calls=50,
    p6_idle_fires=3,
    p6_load_seconds=3,
    p7_agents=300,
    p7_processes=2,
    p7_seconds=8,
    p7_step_seconds=5,
    p7_steps=1,
    p8_agents=500,
    p8_rows_per_agent=20,
    p8_calls=10,
    r1_tasks=500,
    r1_agents=2,
    r1_kills=1,
    r1_window=100,
    r1_deadline_ms=8_000,
    r1_databases=("sqlite",),
    r2_variants=("cut-mid-task", "reply-lost"),
    r3_agents=200,
    r3_processes=2,
    r4_inputs=3_000,
    r4_slow_clients=50,
    r4_slow_readers=1,
    r6_outage_s=3.0,
    r6_agents=4,
)
"""FULL made small: every scenario runs, in seconds rather than minutes."""
