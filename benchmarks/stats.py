"""Figures from samples: the one percentile every measurement in benchmarks/ uses.

Small and dependency-free, so the load generators (separate processes) import it too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest rank; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return float(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))])


def latency_report(seconds: Sequence[float]) -> dict[str, Any]:
    """Calls, p50, p99 and mean of round trips measured in seconds, reported in ms."""
    return {
        "calls": len(seconds),
        "p50_ms": percentile(seconds, 50) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "mean_ms": statistics.fmean(seconds) * 1000 if seconds else math.nan,
    }
