"""What every fault scenario reports and how it runs: its outcome, checks and figures.

A scenario returns an ``Outcome``: the load it ran, the faults it injected, and
one ``Check`` per property it verified. Invariants (nothing lost, nothing let
in) decide a scenario everywhere; timing targets decide it only in a full run,
so the short (quick) version never fails on timing noise. The processes it
starts come from ``services`` and ``procs``, as the benchmarks' do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import traceback
from collections.abc import AsyncIterator, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from benchmarks.procs import Children, memory
from benchmarks.services import postgres_database

DONE_STATES = (2, 3)
"""TaskState.DONE (the agent's result) and FAILED_BY_SERVER (reaped or expired)."""


@dataclass
class Check:
    """One property a scenario verified."""

    name: str
    passed: bool
    detail: str = ""
    target: bool = False
    """A timing target (decides full runs only) rather than an invariant."""


@dataclass
class Outcome:
    """What one scenario ran, injected, checked and measured."""

    scenario: str
    title: str
    enforce_targets: bool = True
    load: str = ""
    faults: str = ""
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def check(self, name: str, passed: bool, detail: str = "", *, target: bool = False) -> bool:
        """Record a check; returns whether it passed."""
        self.checks.append(Check(name, bool(passed), detail, target))
        return bool(passed)

    @property
    def broken(self) -> list[Check]:
        """Invariants that did not hold."""
        return [c for c in self.checks if not c.passed and not c.target]

    @property
    def missed(self) -> list[Check]:
        """Timing targets that were not met."""
        return [c for c in self.checks if not c.passed and c.target]

    @property
    def passed(self) -> bool:
        """No error, every invariant held, and (in a full run) every target was met."""
        if self.error is not None or self.broken or not self.checks:
            return False
        return not (self.enforce_targets and self.missed)

    def explain(self) -> str:
        """The error and every failed check, one a line (for assertion messages)."""
        lines = [f"error: {self.error}"] if self.error else []
        lines += [f"{c.name}: {c.detail}" for c in self.broken + self.missed]
        return "\n".join(lines) or "ok"

    def to_json(self) -> dict[str, Any]:
        """The outcome as a JSON-able object."""
        data = asdict(self)
        data["passed"] = self.passed
        return data


# --------------------------------------------------------------------------- figures


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, rounded for the report; None for none (or NaN: no samples)."""
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 1)


def histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    """Counts of values per [edge, next edge) bucket, with an overflow bucket."""
    counts = {f"{a:g}-{b:g}": 0 for a, b in itertools.pairwise(edges)}
    counts[f">={edges[-1]:g}"] = 0
    counts[f"<{edges[0]:g}"] = 0
    for value in values:
        if value < edges[0]:
            counts[f"<{edges[0]:g}"] += 1
        elif value >= edges[-1]:
            counts[f">={edges[-1]:g}"] += 1
        else:
            for a, b in itertools.pairwise(edges):
                if a <= value < b:
                    counts[f"{a:g}-{b:g}"] += 1
                    break
    return {k: v for k, v in counts.items() if v}


class Background:
    """A coroutine (``_run``) running in the background while a ``with`` block runs."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


class RssSampler(Background):
    """Samples a process's VmRSS every ``interval`` seconds in the background."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []

    async def _run(self) -> None:
        while True:
            value = memory(self.pid).get("vmrss_mb")
            if value is not None:
                self.samples.append(value)
            await asyncio.sleep(self.interval)

    @property
    def peak(self) -> float | None:
        """The largest sample, MiB."""
        return max(self.samples, default=None)


def check_stored(
    outcome: Outcome,
    created: Collection[int],
    uploads: dict[int, dict[str, Any]],
    rows: dict[int, dict[str, Any]],
    settled: bool,
) -> int:
    """Check what a fault under load must keep; returns how many acknowledged things were lost.

    Every task whose create got a reply exists, every result whose upload got
    a reply is stored as uploaded, and every task ended (``settled``: nothing
    ran any more when the scenario looked).
    """
    missing = [i for i in created if i not in rows]
    outcome.check(
        "every task whose create got a reply exists",
        not missing,
        f"{len(missing)} of {len(created)} missing, e.g. {missing[:5]}",
    )
    wrong = []
    for task_id, upload in uploads.items():
        row = rows.get(task_id)
        if (
            row is None
            or row["state"] != 2
            or row["success"] != upload["success"]
            or row["result"] != upload.get("task_event_result")
            or row["timestamp"] != upload["timestamp"]
        ):
            wrong.append(task_id)
    outcome.check(
        "every result whose upload got a reply is stored, as uploaded",
        not wrong,
        f"{len(wrong)} of {len(uploads)} acknowledged results not stored as sent, e.g. {wrong[:5]}",
    )
    open_rows = [i for i, r in rows.items() if r["state"] not in DONE_STATES]
    outcome.check(
        "every task ended: completed by its agent or failed by the server",
        settled and not open_rows,
        f"{len(open_rows)} still without a result, e.g. {open_rows[:5]}",
    )
    return len(missing) + len(wrong)


async def scenario_database(stack: contextlib.AsyncExitStack, database: str) -> str | None:
    """A scenario's database: None for SQLite (the server's own file), else a fresh PostgreSQL
    database's URL, dropped when ``stack`` closes."""
    if database == "sqlite":
        return None
    url: str = await stack.enter_async_context(postgres_database())
    return url


async def wait_for(check: Any, within: float, interval: float = 0.1) -> bool:
    """Await ``check()`` until truthy; False after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return True
        await asyncio.sleep(interval)
    return False


async def metric(url: str, name: str) -> float | None:
    """One unlabelled sample from the server's /metrics, or None."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        text = (await http.get(url + "metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@contextlib.asynccontextmanager
async def scenario(outcome: Outcome, workdir: Path) -> AsyncIterator[Children]:
    """Run a scenario body: its children are stopped and any exception becomes its error."""
    children = Children(workdir)
    started = time.monotonic()
    try:
        yield children
    except Exception as exc:  # the scenario could not finish: reported, never hidden
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.figures["traceback"] = traceback.format_exc(limit=-8)
    finally:
        children.stop_all()
        outcome.figures["duration_s"] = round(time.monotonic() - started, 1)
